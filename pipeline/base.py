"""Base-model stage: the starting model as an ordinary model folder, with the tokenizer of the data artifact.

    python -m pipeline.base [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]

Two kinds of recipe have one: `model.init` builds a fresh model from a config (the offline tiny default), and
`model.gguf` turns a pretrained model shipped as a GGUF file into safetensors, dequantised, checked by logits
parity on held-out rows against the model as transformers loaded it from the file; the manifest records the
file's hash, quantisation and the package that shipped it. A recipe with `model.name_or_path` trains that model
as it is and has no base artifact. Writes `checkpoints/<run>/base/`: safetensors weights, config, generation
config (every stop token), tokenizer with chat template, manifest.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pipeline.core import artifacts, chat, cli, models, stages
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.schema import Recipe

STAGE = stages.BASE


def run(recipe: Recipe, options: stages.Options = stages.Options()) -> stages.Outcome:
    if not STAGE.applies(recipe):
        raise ConfigError(
            f"model.name_or_path is {recipe.model.name_or_path!r}: a pretrained model folder needs no base stage. Run"
            f" the SFT stage next (`{stages.SFT.command} --config {recipe.source_path}`)."
        )

    def work(run: artifacts.StageRun) -> stages.Result:
        out = run.begin()
        tokenizer = chat.load_tokenizer(stages.DATA.folder(recipe) / artifacts.TOKENIZER_DIR)
        stop_ids = chat.stop_token_ids(tokenizer)
        if recipe.model.gguf is not None:
            return _from_gguf(recipe, out, tokenizer, stop_ids, inputs["gguf"]["sha256"])
        model = models.build_from_config(recipe.model.init, tokenizer, stop_ids, recipe.run.seed, recipe.model.dtype)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        parameters = models.parameter_count(model)
        return stages.Result(
            {"parameters": parameters, "stop_token_ids": stop_ids},
            f"base: {model.config.model_type} with {parameters:,} parameters, vocab {len(tokenizer)}",
        )

    # The file's own hash, so that another file under the same name (a package upgrade) makes the artifact stale.
    inputs = (
        {"gguf": artifacts.input_record(models.GGUFFile.resolve(recipe.model.gguf).path)} if recipe.model.gguf else {}
    )
    return stages.execute(STAGE, recipe, work, force=options.force, inputs=inputs)


# The saved weights are the loaded ones, written as they are: any difference is a conversion defect.
GGUF_PARITY_TOLERANCE = 1e-5
PARITY_ROWS = 4


def _from_gguf(recipe: Recipe, out: Path, tokenizer: Any, stop_ids: list[int], sha256: str) -> stages.Result:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    source = models.GGUFFile.resolve(recipe.model.gguf)
    record = source.record(sha256)
    loaded = source.load(recipe.model.dtype)
    loaded.generation_config.eos_token_id = stop_ids
    loaded.generation_config.pad_token_id = tokenizer.pad_token_id
    loaded.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=models.torch_dtype(recipe.model.dtype))
    rows = datasets.load_from_disk(str(stages.DATA.folder(recipe) / artifacts.SFT_DATA_DIR))[artifacts.HELD_OUT_SPLIT]
    difference = 0.0
    with torch.no_grad():
        for ids in rows.select(range(min(PARITY_ROWS, len(rows))))["input_ids"]:
            batch = torch.tensor([ids])
            difference = max(difference, (loaded(batch).logits - saved(batch).logits).abs().max().item())
    if difference > GGUF_PARITY_TOLERANCE:
        raise PipelineError(
            f"the model converted from {source.path} gives logits up to {difference:.3g} apart from the GGUF file's "
            f"(allowed {GGUF_PARITY_TOLERANCE:g}); the conversion is broken, do not train on it."
        )
    parameters = models.parameter_count(saved)
    return stages.Result(
        {"parameters": parameters, "stop_token_ids": stop_ids, "gguf_parity_max_abs_logit_diff": difference},
        f"base: {record['file']} ({record['quantization']}, {source.package or 'a file'}"
        f"{' ' + source.package_version if source.package_version else ''}) as {recipe.model.dtype} safetensors,"
        f" {parameters:,} parameters, logits {difference:.1g} apart from the GGUF's",
        extra={"gguf": record},
    )


main = cli.stage_main(STAGE, run)

if __name__ == "__main__":
    sys.exit(main())
