"""The built-in training recipes: ml_collections configs the installed library needs at run time.

``stage1`` / ``stage2`` are Moore-AnimateAnyone's two training stages (``get_config("tiny")``:
the CPU-sized models of ``tiny``), ``demo`` is what ``anim-jax demo`` trains. The files under the
repository's ``configs/`` are the config files users pass to ``anim-jax train --config``, loaded by
path; they start from these recipes.
"""
