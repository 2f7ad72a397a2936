"""The paper-reproduction kit: the baselines of Table 1, the diagnostics behind Figures 1-2, the sweeps that
regenerate Tables 1-2 with paired confidence intervals, the MLP-oracle study of Section 4.6.2, and the methods
users pick instead of RIFLE (LP-FT, freeze-then-unfreeze) for side-by-side comparison.

Built on the recipe (`hf_rifle.recipe`), which it extends through `RecipeExtension` (see `BASELINES`);
needs the `paper` extra.
"""
