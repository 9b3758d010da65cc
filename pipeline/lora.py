"""A model family's LoRA adapter (``wan.families.Lora``) on the causal transformer, through peft: the
adapter's Linear layers are injected into the transformer blocks, the file's factors loaded into them
and every key checked (a missing, unexpected or wrongly shaped factor is an error naming the file and
the key, never a silent fall back to the base model), then optionally merged into the weights."""
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from utils.loading import WeightFileError, read_state_dict

ADAPTER = "default"  # peft's name of the one adapter


def _adapter_state(path, spec, allow_pickle, pickle_flag):
    """The adapter's factors of the file at ``path``, keys without PEFT's saved prefix."""
    contents = read_state_dict(path, allow_pickle=allow_pickle, pickle_flag=pickle_flag)
    state = contents.get(spec.state_key, contents)
    if not isinstance(state, dict):
        raise WeightFileError(f"{path}: '{spec.state_key}' holds a {type(state).__name__}, not a state dict of tensors")
    where = f"{path} ['{spec.state_key}']" if spec.state_key in contents else str(path)
    factors = {}
    for key, value in state.items():
        if not (isinstance(key, str) and key.startswith(spec.saved_prefix)):
            raise WeightFileError(f"{where}: key {key!r} lacks PEFT's prefix {spec.saved_prefix!r}")
        name = key[len(spec.saved_prefix):]
        rank_dim = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
        if rank_dim is None or getattr(value, "dim", lambda: 0)() != 2:
            raise WeightFileError(f"{where}: {key!r} is not a LoRA factor (lora_A / lora_B weight, 2-D)")
        if value.shape[rank_dim] != spec.rank:
            raise WeightFileError(f"{where}: {key!r} has shape {list(value.shape)}; expected rank {spec.rank}")
        factors[name] = value
    return where, factors


def load_lora(model, path, spec, merge, allow_pickle=False, pickle_flag="--allow_pickle"):
    """Inject ``spec``'s adapter (rank, alpha, target Linear layers of every block) into ``model`` (a
    ``CausalWanModel`` with its weights loaded), load the factors of ``path`` strictly, in the model's
    dtype and on its device, and with ``merge`` fold them into the weights (W + scale · B·A; the
    layers then compute W x alone). Returns the number of adapted layers."""
    where, factors = _adapter_state(path, spec, allow_pickle, pickle_flag)
    targets = [f"blocks.{i}.{target}" for i in range(len(model.blocks)) for target in spec.targets]
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=targets)
    parameter = next(model.parameters())
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(model, factors, adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise WeightFileError(f"{where}: unexpected key {spec.saved_prefix + result.unexpected_keys[0]!r} (no such layer)")
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if missing:
        saved = spec.saved_prefix + missing[0].replace(f".{ADAPTER}.", ".")
        raise WeightFileError(f"{where}: missing key {saved!r} ({len(missing)} LoRA factors missing)")
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        layer.to(device=parameter.device, dtype=parameter.dtype)
        if merge:
            layer.merge()
    return len(layers)
