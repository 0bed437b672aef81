"""The built-in model's world and its training script.

- `world`: the synthetic shapes world (scenes, captions, masks, edit triples) that the built-in
  model is trained on and that benchmarks and examples draw from;
- `train`: the training script (`python -m pipelines.builtin.train`) that writes `assets/builtin`.

Neither is a task; tasks never import from here (only examples, benchmarks and tests do).
"""
