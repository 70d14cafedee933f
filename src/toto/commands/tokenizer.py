"""`toto tokenizer convert-dalle | convert-vqgan | train | info | stats`: make and inspect tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from .argtypes import positive_int
from .common import add_device, add_job_config, add_options, job_config

HELP = ("make a tokenizer file (convert DALL-E dVAE or taming VQGAN weights, or train a dVAE / patch codebook), "
        "inspect one, or measure its codebook coverage")


def add_arguments(p):
    from ..tokenizers.train_dvae import DVAETrainConfig

    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    c = sub.add_parser("convert-dalle", help="convert OpenAI's encoder.pkl/decoder.pkl into one safetensors file",
                       description="Convert the official DALL-E dVAE pickles (which you download yourself) into a "
                                   "toto tokenizer file. Reads the pickles without the dall-e package and without "
                                   "running code from them.")
    c.add_argument("--encoder", required=True, metavar="PKL", help="encoder.pkl (torch.save of dall_e.Encoder)")
    c.add_argument("--decoder", required=True, metavar="PKL", help="decoder.pkl (torch.save of dall_e.Decoder)")
    c.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    c.add_argument("--resolution", type=positive_int, default=128, help="frame size the tokenizer is used at (default 128)")
    c.set_defaults(_action=_convert, _locks_out="file")  # cli.main holds --out's lock

    v = sub.add_parser("convert-vqgan", help="convert a taming-transformers VQGAN checkpoint (last.ckpt) into one "
                                             "safetensors file",
                       description="Convert a taming-transformers VQModel checkpoint (a PyTorch Lightning .ckpt, "
                                   "e.g. the public ImageNet f16 models with 1024 or 16384 codes) into a toto "
                                   "tokenizer file, keeping the encoder, quantizer and decoder. Reads the checkpoint "
                                   "without Lightning or taming and without running code from it.")
    v.add_argument("--checkpoint", required=True, metavar="CKPT", help="the Lightning checkpoint (last.ckpt)")
    v.add_argument("--config", metavar="YAML", help="its model.yaml (optional: the architecture is also read "
                                                    "from the weights; if given, both must agree)")
    v.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    v.add_argument("--resolution", type=int, default=256,
                   help="frame size the tokenizer is used at (default 256: a 16x16 grid at f16; 128 gives 8x8)")
    v.set_defaults(_action=_convert_vqgan, _locks_out="file")

    t = sub.add_parser("train", help="train a tokenizer on frames from videos and images",
                       description="Train a dVAE (Gumbel-softmax, KL to a uniform prior, logit-Laplace loss) or fit "
                                   "a patch k-means codebook on frames pooled from the given media.")
    t.add_argument("--kind", choices=("dvae", "patch", "vqgan"), default="dvae",
                   help="dvae (default) or patch; vqgan is not trainable here (use convert-vqgan)")
    t.add_argument("--media", nargs="+", required=True, metavar="PATH",
                   help="videos, images, folders (recursive) or .txt lists of them")
    t.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    t.add_argument("--resolution", type=positive_int, default=64, help="frame size to train at (default 64)")
    t.add_argument("--max-frames", type=positive_int, default=2000, help="frames pooled from the media (default 2000)")
    t.add_argument("--stride", type=positive_int, default=4, help="keep one video frame every STRIDE (default 4)")
    t.add_argument("--n-codes", type=positive_int, default=512, help="codebook size (default 512)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--restart", action="store_true", help="ignore an existing dVAE checkpoint and start over")
    add_job_config(t, "dvae")
    add_options(t, DVAETrainConfig, "dvae", title="dvae options (defaults: a tiny dVAE that trains on a CPU)")
    pt = t.add_argument_group("patch options")
    pt.add_argument("--patch", type=positive_int, default=8, help="patch size in pixels (default 8)")
    t.set_defaults(_action=_train, _locks_out="file")

    i = sub.add_parser("info", help="print a tokenizer file's identity (kind, codes, resolution, config)")
    i.add_argument("file", metavar="FILE")
    i.set_defaults(_action=_info)

    s = sub.add_parser("stats", help="codebook coverage of a tokenizer on media: codes used, perplexity, PSNR",
                       description="Encode frames pooled from the media with the tokenizer (at its resolution), then "
                                   "report the fraction of codes used, the perplexity of the code distribution, the "
                                   "reconstruction PSNR, and optionally a plot of the sorted code frequencies.")
    s.add_argument("file", metavar="TOKENIZER", help="a tokenizer file (any kind)")
    s.add_argument("media", nargs="+", metavar="MEDIA", help="videos, images, folders (recursive) or .txt lists")
    s.add_argument("--json", metavar="OUT", help="write the summary (and per-code counts) as JSON")
    s.add_argument("--plot", metavar="PNG", help="plot code frequencies, sorted, log scale")
    s.add_argument("--max-frames", type=int, default=256, help="frames pooled from the media (default 256)")
    s.add_argument("--stride", type=int, default=4, help="keep one video frame every STRIDE (default 4)")
    s.add_argument("--seed", type=int, default=0)
    add_device(s)
    s.set_defaults(_action=_stats)


def run(args) -> int:
    return args._action(args)


def _convert(args) -> int:
    from ..errors import ConfigError
    from ..tokenizers.dalle_convert import convert_dalle

    if args.resolution < 1:
        raise ConfigError(f"--resolution must be positive, got {args.resolution}")
    tok = convert_dalle(args.encoder, args.decoder, resolution=args.resolution)
    tok.save(args.out)
    c = tok.cfg
    print(f"wrote {args.out}: dVAE with {c.vocab_size} codes, n_hid {c.n_hid}, {c.group_count} groups x "
          f"{c.n_blk_per_group} blocks, {tok.downsample}x downsampling, {tok.grid[0]}x{tok.grid[1]} codes per "
          f"{c.resolution}px frame (weights {tok.fingerprint()})")
    return 0


def _convert_vqgan(args) -> int:
    from ..errors import ConfigError
    from ..tokenizers.vqgan_convert import convert_vqgan

    if args.resolution < 1:
        raise ConfigError(f"--resolution must be positive, got {args.resolution}")
    tok = convert_vqgan(args.checkpoint, args.config, resolution=args.resolution)
    tok.save(args.out)
    c = tok.cfg
    print(f"wrote {args.out}: VQGAN with {c.n_embed} codes of dimension {c.embed_dim}, ch {c.ch} x "
          f"{list(c.ch_mult)}, attention at {list(c.attn_resolutions)}, {tok.downsample}x downsampling, "
          f"{tok.grid[0]}x{tok.grid[1]} codes per {c.resolution}px frame (weights {tok.fingerprint()})")
    return 0


def _train(args) -> int:
    from ..data.media import sample_frames
    from ..errors import ConfigError

    if args.kind == "vqgan":
        raise ConfigError("--kind vqgan: training a VQGAN is not implemented (it needs perceptual and adversarial "
                          "losses and days on GPUs); convert a taming-transformers checkpoint with "
                          "`toto tokenizer convert-vqgan --checkpoint last.ckpt --out vqgan.safetensors`")
    if args.kind == "dvae":  # validate options before the (slow) decoding
        from ..device import resolve_device
        from ..tokenizers.train_dvae import DVAETrainConfig, train_dvae

        cfg = job_config(DVAETrainConfig, "dvae", args,
                         vocab_size=args.n_codes, resolution=args.resolution, seed=args.seed)
        resolve_device(cfg.device)
    elif args.patch < 1 or args.resolution % args.patch:
        raise ConfigError(f"--resolution {args.resolution} is not a multiple of --patch {args.patch}")
    frames = sample_frames([Path(m) for m in args.media], args.resolution, args.max_frames, seed=args.seed,
                           stride=args.stride)  # (N, R, R, 3) uint8
    print(f"pooled {len(frames)} frames of {args.resolution}x{args.resolution} from {len(args.media)} input(s)")
    if args.kind == "patch":
        from ..tokenizers.patch import PatchTokenizer
        from ..tokenizers.stats import codebook_usage, psnr

        tok = PatchTokenizer.fit(frames, n_codes=args.n_codes, patch=args.patch, resolution=args.resolution,
                                 seed=args.seed)
        tok.save(args.out)
        codes = tok.encode(frames)
        use = codebook_usage(codes, tok.n_codes)
        print(f"wrote {args.out}: patch tokenizer, {tok.n_codes} codes of {args.patch}x{args.patch} patches; "
              f"on the fitting frames: PSNR {psnr(frames, tok.decode(codes), per_frame=True):.2f} dB, "
              f"{use['used']}/{tok.n_codes} codes used")
        return 0

    tok, rep = train_dvae(frames, cfg, args.out, progress=not args.no_progress, resume=not args.restart)
    h = rep["held_out"]
    print(f"wrote {args.out}: dVAE, {tok.n_codes} codes; held-out ({rep['frames']['held_out']} frames): "
          f"PSNR {h['psnr']:.2f} dB, {h['used']}/{tok.n_codes} codes used ({100 * h['usage']:.1f}%), "
          f"perplexity {h['perplexity']:.1f}; samples {rep['samples_png']}; report {rep['report_json']}")
    return 0


def _info(args) -> int:
    from ..tokenizers.base import get_tokenizer

    tok = get_tokenizer(args.file)
    print(json.dumps(tok.identity(), indent=2))
    return 0


def _stats(args) -> int:
    from ..data.media import sample_frames
    from ..device import resolve_device
    from ..errors import ConfigError
    from ..ioutil import atomic_write_json
    from ..tokenizers.base import get_tokenizer
    from ..tokenizers.stats import code_stats, plot_code_frequencies

    if args.max_frames < 1 or args.stride < 1:
        raise ConfigError(f"--max-frames and --stride must be positive, got {args.max_frames} and {args.stride}")
    tok = get_tokenizer(args.file, device=resolve_device(args.device))
    frames = sample_frames([Path(m) for m in args.media], tok.resolution, args.max_frames, seed=args.seed,
                           stride=args.stride)
    summary, counts = code_stats(tok, frames, progress=not args.no_progress)
    summary["tokenizer"] = str(args.file)
    print(f"{args.file} ({tok.kind}, {tok.n_codes} codes) on {summary['frames']} frames of {tok.resolution}px "
          f"({summary['positions']} positions): {summary['used']}/{tok.n_codes} codes used "
          f"({100 * summary['usage']:.1f}%; at most {100 * summary['usage_bound']:.1f}% with this many positions), "
          f"perplexity {summary['perplexity']:.1f}, PSNR {summary['psnr']:.2f} dB")
    print(f"reference: {summary['reference']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, {**summary, "counts": counts.tolist()})
        print(f"wrote {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_code_frequencies(counts, args.plot, f"{Path(args.file).name}: {summary['used']}/{tok.n_codes} codes, "
                                                 f"perplexity {summary['perplexity']:.0f}")
        print(f"wrote {args.plot}")
    return 0
