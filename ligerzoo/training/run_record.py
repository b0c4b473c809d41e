"""What a run records in each checkpoint, and what a resumed run may change.

A checkpoint holds weights of one shape, trained on one tokenizer's ids: a resume with another
model shape, tokenizer or set of Medusa heads cannot continue it, and is refused with every
difference listed. Everything else (learning rate and schedule, steps, checkpoint cadence,
batch size, world size, the data) may change between runs; a change takes effect and is reported.
"""

import dataclasses

from ligerzoo.training.config import Config

# The Medusa settings that decide which tensors the checkpoint holds.
MEDUSA_SHAPE = ("num_heads", "num_layers", "shared_output")


def run_record(config: Config, model_config: dict, tokenizer_fingerprint: dict, world_size: int) -> dict:
    """The JSON-serialisable record saved with each checkpoint."""
    return {"config": dataclasses.asdict(config), "model_config": model_config,
            "tokenizer": tokenizer_fingerprint, "world_size": world_size}


def resume_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(conflicts that forbid resuming, changes that take effect), each a readable line."""
    conflicts, changes = [], []
    saved_model, current_model = saved.get("model_config", {}), current["model_config"]
    for key in sorted(set(saved_model) | set(current_model)):
        if saved_model.get(key) != current_model.get(key):
            conflicts.append(f"model {key}: {saved_model.get(key)!r} in the checkpoint, {current_model.get(key)!r} now")
    if saved.get("tokenizer") != current["tokenizer"]:
        conflicts.append(f"tokenizer: {_describe_tokenizer(saved.get('tokenizer'))} in the checkpoint, "
                         f"{_describe_tokenizer(current['tokenizer'])} now")
    saved_settings, current_settings = _flatten(saved.get("config", {})), _flatten(current["config"])
    for key in sorted(set(saved_settings) | set(current_settings)):
        before, after = saved_settings.get(key), current_settings.get(key)
        if before == after or key == "data.tokenizer":  # the tokenizer is compared by fingerprint
            continue
        section, _, name = key.partition(".")
        if section == "model" and name != "name":
            continue  # the model's shape is compared above, as built
        line = f"{key}: {before!r} -> {after!r}"
        (conflicts if section == "medusa" and name in MEDUSA_SHAPE else changes).append(line)
    if saved.get("world_size", current["world_size"]) != current["world_size"]:
        changes.append(f"world size: {saved['world_size']} -> {current['world_size']}")
    return conflicts, changes


def _describe_tokenizer(fingerprint: dict | None) -> str:
    if not fingerprint:
        return "unknown"
    return f"{fingerprint.get('kind')} with {fingerprint.get('vocab_size')} ids"


def _flatten(config: dict) -> dict:
    flat = {}
    for section, values in config.items():
        for name, value in (values.items() if isinstance(values, dict) else ()):
            flat[f"{section}.{name}"] = list(value) if isinstance(value, tuple) else value
    return flat
