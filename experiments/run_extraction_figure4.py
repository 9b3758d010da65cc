"""Record the pre-softmax self-attention logits of chosen layers for the last temporal block.

Runs the real block-wise, KV-cached inference with ``ATTENTION_WEIGHT_CAPTURE`` on and saves, per
requested transformer block, the chosen pass of the last block: its queries against every cached key
(Deep Forcing, Figure 4). The capture does not change the generated video. One prompt and seed give
one ``--output_path`` file (the spec's run); several prompts and/or seeds are a sweep into
``--output_dir``, one file per item, resumable, and shared across processes under torchrun. See
README.md for the output layout.

Arguments and the config are checked before torch and the models are imported: a mistake is
reported within a second or two.
"""
import os
import sys

if __name__ == "__main__":  # from here to the last line a signal exits 128 + signal with one line (utils/output.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, from any folder
    from utils.output import exit_on_signals_from_start
    exit_on_signals_from_start("run_extraction_figure4.py")

import argparse

from pipeline.plan import DEFAULT_CONFIG, DEFAULT_OUTPUT, DEFAULT_PROMPT, UsageError, options_from_args
from pipeline.run import run
from pipeline.sweep import MANIFEST, SWEEP_SETTINGS, SweepFolderError
from utils.cli import ArgumentParser
from utils.output import exit_status, output_path_arg
from utils.passes import LAST_BLOCK
from wan.families import DEFAULT_FAMILY


EPILOG = """examples (from any folder; configs/ and the default files are found in the repository):
  # tiny random-weights model, no files, CPU (the CPU is the default on a machine without a GPU)
  python experiments/run_extraction_figure4.py --config_path configs/tiny.yaml
  # Self-Forcing checkpoint (wan_models/Wan2.1-T2V-1.3B + checkpoints/self_forcing_dmd.pt), one GPU
  python experiments/run_extraction_figure4.py --output_path cache/self_forcing.pt
  # base Wan2.1, 4 layers, exact summaries only
  python experiments/run_extraction_figure4.py --no_checkpoint --layer_indices 0 4 8 12 --save_mode summary
  # a sweep: 2 prompts x 3 seeds, every pass of the last block, one file per item (re-run to resume)
  python experiments/run_extraction_figure4.py --prompt "a cat" --prompt "a dog" --seeds 0-2 \\
      --capture_step all --save_mode summary --output_dir cache/sweep
  # the same sweep on 4 GPUs
  torchrun --nproc_per_node 4 experiments/run_extraction_figure4.py --prompts_file prompts.txt \\
      --seeds 0-63 --save_mode summary --output_dir cache/sweep
  # Rolling Forcing's tiny model: the last block's five calls (levels 0..4) and its cache call
  python experiments/run_extraction_figure4.py --config_path configs/tiny_rolling_forcing.yaml \\
      --capture_step all --save_mode summary
exit status: 0 done; 1 failed while running (e.g. no space left); 2 bad input (nothing written);
129 SIGHUP, 130 Ctrl-C, 143 SIGTERM (the file being written is left as it was, no temporary file; while starting
nothing is written; after the output is written, one line says it is complete)"""


def build_parser():
    parser = ArgumentParser(
        prog="run_extraction_figure4.py",
        description="Capture the last block's pre-softmax self-attention logits of chosen layers during real "
        "causal inference (Deep Forcing Figure 4).",
        epilog=EPILOG,
    )
    parser.add_argument("--config_path", default="configs/self_forcing_dmd.yaml",
                        help=f"inference config, merged onto the repository's {DEFAULT_CONFIG}; a relative path not "
                        "found from the current folder is looked up in the repository; configs/tiny.yaml runs "
                        "anywhere with random weights")
    parser.add_argument("--checkpoint_path", default=None,
                        help="generator checkpoint (a dict with 'generator' / 'generator_ema'); default: the config's model "
                        f"family's, {DEFAULT_FAMILY.variant().checkpoint.default_path} for Self-Forcing; none for a "
                        "config of random weights (random_init)")
    parser.add_argument("--output_path", default=None, type=output_path_arg,
                        help=f"where the .pt cache of a single run is written, atomically (default {DEFAULT_OUTPUT}); "
                        "a symlink is followed and its target replaced; devices, FIFOs and folders are refused")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"text prompt; repeat for several (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--prompts_file", default=None,
                        help="UTF-8 text file (a regular file of at most 64 MiB), one prompt per line; blank lines and "
                        "lines starting with # are skipped")
    parser.add_argument("--num_frames", type=int, default=21,
                        help="latent frames to generate; a multiple of num_frame_per_block (default 21)")
    parser.add_argument("--layer_indices", nargs="+", default=["0", "4"],
                        help="transformer blocks whose self-attention is captured, 0-based (0 4 = the paper's L1 and L5), "
                        "in the order given; 'all' for every layer")
    parser.add_argument("--no_checkpoint", action="store_true", default=False,
                        help="do not load a checkpoint: use the base Wan2.1 weights from the model folder (a config "
                        "of random weights loads none anyway)")
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None,
                        help="load the checkpoint's 'generator_ema' (--no-use_ema: 'generator'); default: as the family's "
                        "release does (Self-Forcing: generator_ema)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the noise (default 42)")
    parser.add_argument("--seeds", nargs="+", default=None,
                        help="several seeds for a sweep: integers and ranges, e.g. 0 1 2 or 0-63 (replaces --seed)")
    parser.add_argument("--output_dir", default=None,
                        help=f"folder of a sweep: one cache per item named p<prompt>_s<seed>.pt (e.g. p0003_s0001.pt, "
                        f"0-based prompt index), {MANIFEST} (a line per finished item) and {SWEEP_SETTINGS}; "
                        "re-running the same command skips the items already complete")
    parser.add_argument("--overwrite", action="store_true",
                        help="in an --output_dir made with other settings: redo every item with the new settings")
    parser.add_argument("--gpu_id", type=int, default=0,
                        help="the GPU of the default device cuda:GPU_ID (default 0; ignored under torchrun, where each "
                        "process takes cuda:LOCAL_RANK, and with --device)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:N]; default cuda:{gpu_id} (under torchrun, cuda:LOCAL_RANK), or the CPU, "
                        "with a note, on a machine without a GPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--capture_step", default="0",
                        help="which pass of the last block is kept: 0..3 the denoising passes (t = 1000, 937.5, 833.33, 625), "
                        "'cache' the clean cache-update pass, 'all' every one of them (one entry per layer and pass); "
                        "Rolling Forcing (a window of 5 blocks per call): K = the call where the block is at level K "
                        "(0..4, its whole window kept), 'cache' the cache call that writes the block")
    parser.add_argument("--capture_blocks", nargs="+", default=[LAST_BLOCK],
                        help="temporal blocks whose pass is kept, 0-based block indices and/or 'last' (e.g. 6 20 40 last); "
                        "one entry per layer, block and pass; Rolling Forcing's last window: --capture_blocks last "
                        "--capture_step 4")
    parser.add_argument("--precision", choices=("exact", "fast"), default=None,
                        help="exact: upstream Self-Forcing's arithmetic (bit-identical bf16 latents); fast: the same model "
                        "with fp32 RoPE tables, fused norms and torch.compile (default: fast on a GPU, exact on the CPU)")
    parser.add_argument("--model_dir", default=None, help="overrides the config's model_dir (folder of the official Wan2.1 files)")
    parser.add_argument("--save_mode", choices=("full", "summary"), default="full",
                        help="full: fp16 logits [B, N, Q, K] per layer and pass (3.7 GB each at full size); summary: exact fp32 "
                        "query-averaged logits, frame-level means and attention mass (kilobytes)")
    parser.add_argument("--switch", nargs=2, action="append", default=None, metavar=("FRAME", "PROMPT"),
                        help="switch to PROMPT from the first block that starts at or after latent FRAME, with the "
                        "cache re-encoded (LongLive's interactive mode: model_kwargs.attention_mode longlive); repeat "
                        "for several switches; every item of a sweep switches alike")
    parser.add_argument("--lora_path", default=None,
                        help="LoRA adapter loaded on the checkpoint, for a family that has one (LongLive); default: the "
                        "family's (longlive_models/models/lora.pt); merged into the weights in fast mode")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="load a checkpoint that holds more than tensors by full unpickling (runs code from the file; "
                        "only for files you trust)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; default: 1 for small models on the CPU (fastest for them, also on a "
                        "busy machine), torch's own choice otherwise; at most 4 per CPU (1024 in all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and a shorter report (one line per item)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    options = options_from_args(parse_args(argv))
    return exit_status(lambda: run(options), (UsageError, SweepFolderError))


if __name__ == "__main__":
    sys.exit(main())
