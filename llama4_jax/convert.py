"""llama4-convert: checkpoint conversion (or python -m llama4_jax.convert).

    llama4-convert hf-to-orbax SRC DST [--dtype=bfloat16] [--overwrite] [--compress]
    llama4-convert orbax-to-hf SRC DST [--max-shard-size=5GB] [--dtype=...] [--overwrite] [--merge-lora]
    llama4-convert meta-to-orbax SRC DST [--dtype=...] [--overwrite] [--compress]
    llama4-convert export-lora SRC DST [--format=peft|orbax] [--overwrite]

    llama4-convert hf-to-orbax /data/Llama-4-Scout-17B-16E gs://BUCKET/scout-orbax --dtype=bfloat16

SRC/DST are directories (either may be gs://, but a Meta source). Flags may be spelled with dashes or
underscores (--max-shard-size, --max_shard_size). hf-to-orbax reads a Hugging Face Llama 4 checkpoint
(Llama4ForCausalLM or the released Llama4ForConditionalGeneration); orbax-to-hf reads a converted
checkpoint or a training workdir; meta-to-orbax reads Meta's params.json + consolidated.NN.pth shards
(torch needed; weights-only loading). With --merge-lora, orbax-to-hf takes a LoRA fine-tune (its workdir) and writes the base with the
adapters folded in. export-lora writes a LoRA fine-tune's adapters alone: PEFT's adapter_config.json +
adapter_model.safetensors (attention, dense MLP and shared-expert adapters), or an Orbax checkpoint.
The conversions stream one tensor at a time, show progress on stderr and print a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from llama4_jax.cli import dashed


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="llama4-convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_text in (("hf-to-orbax", "Hugging Face safetensors directory -> Orbax checkpoint"),
                          ("orbax-to-hf", "Orbax checkpoint or training workdir -> Hugging Face directory"),
                          ("meta-to-orbax", "Meta params.json + consolidated.*.pth -> Orbax checkpoint"),
                          ("export-lora", "LoRA fine-tune -> its adapters (PEFT layout or Orbax)")):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: keep the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    if name in ("hf-to-orbax", "meta-to-orbax"):
      p.add_argument("--compress", action="store_true",
                     help="zstd-compress the Orbax arrays (about 25%% smaller for bf16, slower to write "
                          "and read)")
    if name == "orbax-to-hf":
      p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
      p.add_argument("--merge-lora", action="store_true",
                     help="SRC is a LoRA fine-tune: fold its adapters into the frozen base it names")
    if name == "export-lora":
      p.add_argument("--format", choices=("peft", "orbax"), default="peft")
  return parser


def _return_freed_memory() -> None:
  """glibc raises its mmap threshold after large frees, after which freed tensors stay in the heap and
  the process grows with the checkpoint; a fixed threshold returns every large tensor to the OS."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
  except (OSError, AttributeError):
    pass


def main(argv=None) -> int:
  args = _parser().parse_args(dashed(sys.argv[1:] if argv is None else list(argv)))
  _return_freed_memory()
  from llama4_jax.checkpoint.convert import hf_to_orbax, meta_to_orbax, orbax_to_hf
  from llama4_jax.checkpoint.lora import export_lora, merged_to_hf
  from llama4_jax.checkpoint.safetensors_io import CheckpointError
  try:
    if args.command in ("hf-to-orbax", "meta-to-orbax"):
      convert = hf_to_orbax if args.command == "hf-to-orbax" else meta_to_orbax
      summary = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                        progress=not args.quiet, compress=args.compress)
    elif args.command == "export-lora":
      summary = export_lora(args.src, args.dst, args.format, args.overwrite)
    elif args.merge_lora:
      summary = merged_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                             overwrite=args.overwrite, progress=not args.quiet)
    else:
      summary = orbax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                            overwrite=args.overwrite, progress=not args.quiet)
  except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
