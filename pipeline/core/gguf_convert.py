"""llama.cpp's convert_hf_to_gguf.py, run in a process of its own (it puts its own copy of the gguf package first on
sys.path), with two additions the export needs:

    python -m pipeline.core.gguf_convert CONVERTER_DIR PRE_TOKENIZER END_OF_TURN_ID MODEL_DIR [converter options]

- PRE_TOKENIZER ("-" for none): llama.cpp's name for the tokenizer's pre-tokenization, used only where the converter
  does not know the vocabulary. It recognises a pre-tokenizer by hashing a test text's token ids, which depend on
  the vocabulary, so a tokenizer trained for a run never matches although its rules are llama.cpp's; the export
  stage names them from the tokenizer's structure and then proves them by tokenization parity.
- The end-of-turn token and "no BOS" written into the metadata, so llama.cpp stops where the chat template ends a
  turn and tokenizes prompts as the training tokenizer does.
"""

from __future__ import annotations

import runpy
import sys


def main(converter_dir: str, pre_tokenizer: str, end_of_turn: str, *converter_arguments: str) -> None:
    sys.path[:0] = [converter_dir, f"{converter_dir}/gguf-py"]
    from conversion.base import TextModel

    known_pre_tokenizer = TextModel.get_vocab_base_pre
    prepare_metadata = TextModel.prepare_metadata

    def get_vocab_base_pre(self, tokenizer) -> str:  # noqa: ANN001 (the converter's own types)
        try:
            return known_pre_tokenizer(self, tokenizer)
        except NotImplementedError:
            if pre_tokenizer == "-":
                raise
            return pre_tokenizer

    def prepare_metadata_with_turns(self, vocab_only: bool) -> None:  # noqa: ANN001
        prepare_metadata(self, vocab_only)
        written = self.gguf_writer.kv_data[0]
        if "tokenizer.ggml.eot_token_id" not in written:
            self.gguf_writer.add_eot_token_id(int(end_of_turn))
        if "tokenizer.ggml.add_bos_token" not in written:
            self.gguf_writer.add_add_bos_token(False)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    TextModel.prepare_metadata = prepare_metadata_with_turns
    sys.argv = [f"{converter_dir}/convert_hf_to_gguf.py", *converter_arguments]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(*sys.argv[1:])
