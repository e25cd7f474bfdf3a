"""Tiny model sizes shared by the tests, the CPU benchmark and the demo.

The SD1.5 architecture shrunk: same block types and wiring (a cross-attention down block, a plain
down block, the mid block with attention, mirrored up blocks), 8x VAE downsampling and an 8x
PoseGuider, so a 64x64 image is an 8x8 latent. Everything runs on a CPU in seconds.
"""

UNET = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    num_attention_heads=2,
    cross_attention_dim=32,
    norm_num_groups=8,
)

VAE = dict(
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
)

IMAGE_ENCODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_hidden_layers=1,
    image_size=32,
    patch_size=8,
    projection_dim=32,  # = UNET cross_attention_dim
)

POSE_GUIDER = dict(
    conditioning_embedding_channels=32,  # = UNET block_out_channels[0]
    block_out_channels=(4, 8, 8, 16),  # three stride-2 convs: 8x, like the VAE
)

MOTION = dict(
    num_attention_heads=2,
    num_transformer_block=1,
    norm_num_groups=8,
    temporal_position_encoding_max_len=32,
    levels=(0, 1),
    use_mid_block=True,
    zero_initialize=True,
)

RESOLUTION = (64, 64)  # (height, width)
CLIP_SIZE = IMAGE_ENCODER["image_size"]
NUM_FRAMES = 4  # stage-2 clip length


def components() -> dict:
    """The ``config.model.components`` of a tiny run."""
    return dict(unet=dict(UNET), vae=dict(VAE), image_encoder=dict(IMAGE_ENCODER), pose_guider=dict(POSE_GUIDER))
