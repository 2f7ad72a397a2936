"""The training recipe (`hf-rifle-train`): a Hub, local or packaged dataset in, a RIFLE fine-tuned classifier out.

Built on the core (`hf_rifle`); needs the `recipe` extra (timm, torchvision, datasets), and the `demo` extra
for the offline default run. `main` takes `RecipeExtension`s, the way the paper kit adds its baselines.
"""

from .train import ModelArguments, RecipeArguments, RecipeExtension, cli, load_model, main, parse_args

__all__ = ["ModelArguments", "RecipeArguments", "RecipeExtension", "cli", "load_model", "main", "parse_args"]
