"""`toto export`: a trained checkpoint as a Hugging Face LlamaForCausalLM folder."""

from __future__ import annotations

HELP = "export a checkpoint to a Hugging Face Llama folder (config.json + model.safetensors)"

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT",
                   help="run folder (its latest checkpoint is used) or a checkpoints/step_* folder")
    p.add_argument("--hf", required=True, metavar="OUT_DIR",
                   help="folder to write; LlamaForCausalLM.from_pretrained(OUT_DIR) loads it")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight precision to write")


def run(args) -> int:
    import torch

    from ..model.export import export_checkpoint
    from ..ioutil import file_lock

    with file_lock(args.hf, "toto export"):  # the folder is swapped in whole: locked like a file (cli.output_lock)
        out = export_checkpoint(args.checkpoint, args.hf, getattr(torch, DTYPES[args.dtype]))
    print(f"wrote {out}/config.json and {out}/model.safetensors "
          f"(load with transformers.LlamaForCausalLM.from_pretrained({str(out)!r}))")
    return 0
