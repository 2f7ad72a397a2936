"""Loads a model by its Hub id and from the local folder it was uploaded from, as users load it (transformers'
pipeline and AutoModelForImageClassification, and timm's `hf-hub:` for timm models), and prints what each predicts
as JSON, for a test to compare."""

import json
import sys

import numpy as np
import PIL.Image
import torch
from transformers import AutoModelForImageClassification, pipeline

repo_id, folder, is_timm = sys.argv[1], sys.argv[2], sys.argv[3] == "timm"
images = [
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)) for seed in range(3)
]
inputs = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def logits(model) -> list:
    with torch.no_grad():
        output = model.eval()(inputs)
    return getattr(output, "logits", output).tolist()


report = {}
for source in ("hub", "local"):
    name = repo_id if source == "hub" else folder
    report[f"pipeline_{source}"] = [pipeline("image-classification", model=name)(image) for image in images]
    report[f"auto_{source}"] = logits(AutoModelForImageClassification.from_pretrained(name))
    if is_timm:
        import timm

        prefix = "hf-hub:" if source == "hub" else "local-dir:"
        report[f"timm_{source}"] = logits(timm.create_model(prefix + name, pretrained=True))
print("REPORT " + json.dumps(report))
