"""`anelab bench`: speed and memory of guided sampling, measured against plain SD and diffusers' port.

Every figure is a median over ``repeats`` runs; the programs of one comparison are run alternately
in the same process. Workloads (issue: speed and memory):

- ``tiny``: the tiny pipeline on the CPU, 256 px, 25 steps, thresholds and ``max_iter_to_alter``
  rescaled from the 50-step defaults;
- ``sd14-cpu``: random weights of SD-1.4's real size on the CPU, 512 px, 4 steps, at most 2
  refinement rounds (a CPU cannot afford more);
- ``sd14-gpu``: the same model on CUDA in fp16, 512 px, the full 50 steps and defaults;
- ``tiny-sd3``, ``tiny-flux``: the transformer stand-ins on the CPU, 256 px, their pipelines' 28 steps: (f) plain
  sampling against the family's own diffusers pipeline (time and latent difference) and A&E against plain, and (e)
  the methods that apply (every one but InitNO, which reads self-attention).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from . import fast as fast_path
from .config import GuidanceConfig
from .errors import AnelabError
from .io import atomic_path
from .loading import load_pipeline
from .memory import HeldForBackward
from .pipeline import generate
from .recording import Record
from .stand_ins import sd14_sized_pipeline

RESULTS_DIR = Path("benchmarks") / "results"  # under the working directory (never inside the installed package)
PROMPT, TOKENS, INDICES = "a cat and a dog", ["cat", "dog"], [2, 5]
COMPARISONS = (
    "a_vs_diffusers_port",
    "b_vs_plain_sd",
    "c_batching",
    "d_recording",
    "e_methods",
    "f_transformer",
)  # result keys, by letter
TRANSFORMERS = ("tiny-sd3", "tiny-flux")
METHOD_PROMPT, METHOD_SUBJECTS = "a red apple and a blue bowl", [("apple", ["red"]), ("bowl", ["blue"])]


@dataclasses.dataclass
class Workload:
    name: str
    size: int
    steps: int
    device: str
    dtype: torch.dtype
    max_refinement_steps: int = 20
    repeats: int = 5  # timed runs per program (the figure is their median)
    warmup: bool = True  # one untimed run of each program first (allocator, caches, CUDA kernels)

    def config(self, **changes) -> GuidanceConfig:
        return (
            GuidanceConfig(max_refinement_steps=self.max_refinement_steps).rescaled(50, self.steps).replace(**changes)
        )

    def method(self, name: str):
        """Method ``name`` at its official defaults for this workload: its loop-index settings rescaled to the steps,
        its resolutions to the image side (the same fraction of the image as at 512 px), refinement capped as the
        workload caps A&E's."""
        from . import methods

        method = methods.get(name).rescaled(50, self.steps)
        if self.name not in TRANSFORMERS:  # a transformer's maps are pooled to 16x16 at any side
            method = method.at_scale(self.size / 512) or method
        caps = {k: self.max_refinement_steps for k in ("max_refinement_steps", "max_refinement_steps_first")}
        return method.replace(**{k: min(v, getattr(method, k)) for k, v in caps.items() if hasattr(method, k)})


WORKLOADS = {
    "tiny": Workload("tiny", 256, 25, "cpu", torch.float32),
    "sd14-cpu": Workload("sd14-cpu", 512, 4, "cpu", torch.float32, max_refinement_steps=2, repeats=1, warmup=False),
    "sd14-gpu": Workload("sd14-gpu", 512, 50, "cuda", torch.float16),
    "tiny-sd3": Workload("tiny-sd3", 256, 28, "cpu", torch.float32),
    "tiny-flux": Workload("tiny-flux", 256, 28, "cpu", torch.float32),
}


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or the process RSS sampled every 5 ms on the CPU (above the start)."""

    def __init__(self, device: str):
        self.device, self.peak = torch.device(device).type, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.process, self.stop = psutil.Process(), threading.Event()
            self.base = self.peak_rss = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = self.peak_rss - self.base


def _timed(device: str, run) -> tuple[float, int, object]:
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = run()
        if memory.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, memory.peak, result


def _alternate(programs: dict, repeats: int, device: str, warmup: bool) -> dict:
    """Run the programs alternately ``repeats`` times (after one untimed round if ``warmup``); median seconds and peak memory of each."""
    times = {k: [] for k in programs}
    peaks = {k: [] for k in programs}
    last = {}
    for run in programs.values() if warmup else ():
        run()
    for _ in range(repeats):
        for name, run in programs.items():
            seconds, peak, last[name] = _timed(device, run)
            times[name].append(seconds)
            peaks[name].append(peak)
    return {
        k: {
            "seconds": statistics.median(times[k]),
            "peak_bytes": int(statistics.median(peaks[k])),
            "runs": times[k],
            "result": last[k],
        }
        for k in programs
    } | {"repeats": repeats, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def port_class():
    """diffusers' ``StableDiffusionAttendAndExcitePipeline`` (deprecated there, last supported 0.33): a clear
    error if this diffusers no longer has it (comparison (a) and the parity tests need it)."""
    try:
        from diffusers import StableDiffusionAttendAndExcitePipeline
    except ImportError:
        import diffusers

        raise AnelabError(
            f"diffusers {diffusers.__version__} no longer ships StableDiffusionAttendAndExcitePipeline (deprecated); "
            "comparison (a) needs it: run --comparisons bcd, or install a diffusers that has it"
        ) from None
    return StableDiffusionAttendAndExcitePipeline


def _port(pipe, max_refinement_steps: int):
    """diffusers' port on the same components; its refinement cap (20, not a ``__call__`` argument) set to ours."""
    StableDiffusionAttendAndExcitePipeline = port_class()

    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    port = StableDiffusionAttendAndExcitePipeline(**components, requires_safety_checker=False)
    port.set_progress_bar_config(disable=True)
    port._perform_iterative_refinement_step = functools.partial(
        port._perform_iterative_refinement_step, max_refinement_steps=max_refinement_steps
    )
    return port


def run_bench(
    workload: str | Workload = "tiny",
    repeats: int | None = None,
    progress: bool = True,
    results_dir: Path = RESULTS_DIR,
    comparisons: str = "abcd",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    methods=None,
) -> dict:
    """Measure ``comparisons`` (a)–(e) on one workload (a name of :data:`WORKLOADS` or a :class:`Workload`
    on the tiny pipeline), ``repeats`` timed runs of each program (None: the workload's own); (e) times ``methods``
    (names of :func:`anelab.methods.names`; None: all) at their official defaults against plain SD;
    returns the results, also written to ``results_dir/<workload>.json``.

    Comparisons not run now are kept from that file when it holds the same workload on the same
    device, so a slow workload can be measured one comparison at a time."""

    w = WORKLOADS[workload] if isinstance(workload, str) else workload
    w = dataclasses.replace(
        w, device=str(device or w.device), dtype=dtype or w.dtype
    )  # --device / --dtype override the workload's
    transformer = w.name in TRANSFORMERS
    allowed = "ef" if transformer else "abcde"
    unknown = set(comparisons) - set(allowed)
    if unknown or not comparisons:
        raise AnelabError(f"comparisons must be letters of {allowed!r} on the {w.name} workload, got {comparisons!r}")
    from . import methods as registry

    every = [m for m in registry.names() if not (transformer and m == "initno")]  # InitNO reads self-attention
    chosen = list(every if methods is None else methods)
    strange = [m for m in chosen if m not in registry.REGISTRY]
    if strange:
        raise AnelabError(f"unknown method(s) {strange}; the methods are {', '.join(registry.names())}")
    if torch.device(w.device).type == "cuda" and not torch.cuda.is_available():
        raise AnelabError(f"the {w.name} workload needs a CUDA GPU and torch sees none here; run tiny or sd14-cpu")
    pipe = (
        sd14_sized_pipeline(device=w.device, dtype=w.dtype)
        if w.name.startswith("sd14")
        else load_pipeline(w.name if transformer else "tiny", device=w.device, dtype=w.dtype)
    )
    common = dict(num_inference_steps=w.steps, height=w.size, width=w.size, output_type="latent", progress=False)
    defaults, no_refinement = w.config(), w.config(thresholds={})
    repeats = repeats or w.repeats
    fast_differs = fast_path.available(
        torch.device(w.device)
    )  # on CUDA the fast path is the default: time it against eager
    identity = {k: v for k, v in dataclasses.asdict(w).items() if k != "repeats"} | {"dtype": str(w.dtype)}
    results = {"workload": identity, "device": _device_name(w.device)}
    say = print if progress else (lambda *a, **k: None)

    if "a" in comparisons:
        # (a) anelab vs diffusers' StableDiffusionAttendAndExcitePipeline, identical inputs, default thresholds
        port = _port(pipe, w.max_refinement_steps)

        def run_port():
            return port(
                PROMPT,
                token_indices=INDICES,
                generator=torch.Generator("cpu").manual_seed(0),
                num_inference_steps=w.steps,
                height=w.size,
                width=w.size,
                attn_res=(defaults.attention_res,) * 2,
                thresholds=defaults.thresholds,
                max_iter_to_alter=defaults.max_iter_to_alter,
                output_type="latent",
            ).images

        say(f"[{w.name}] (a) anelab vs diffusers port ...")
        a = _alternate(
            {
                "anelab": lambda: generate(pipe, PROMPT, TOKENS, seeds=[0], config=defaults, **common).latents,
                "diffusers_port": run_port,
            },
            repeats,
            w.device,
            w.warmup,
        )
        mine, theirs = (a[k].pop("result").double() for k in ("anelab", "diffusers_port"))
        difference = (mine - theirs).abs().max().item()
        results["a_vs_diffusers_port"] = a | {
            "time_ratio": a["anelab"]["seconds"] / a["diffusers_port"]["seconds"],
            "max_abs_latent_difference": difference,
            "relative_latent_difference": difference / theirs.abs().max().item(),
        }

    if "b" in comparisons:
        say(f"[{w.name}] (b) A&E vs plain SD, and diffusers' own plain pipeline ...")
        plain = _plain_diffusers(pipe)
        programs = {
            "diffusers_sd": lambda: (
                plain(
                    PROMPT,
                    generator=torch.Generator("cpu").manual_seed(0),
                    num_inference_steps=w.steps,
                    height=w.size,
                    width=w.size,
                    output_type="latent",
                ).images
            ),
            "sd": lambda: generate(pipe, PROMPT, TOKENS, seeds=[0], config=None, **common).latents,
            "ae_no_refinement": lambda: (
                generate(pipe, PROMPT, TOKENS, seeds=[0], config=no_refinement, **common).latents
            ),
            "ae_defaults": lambda: generate(pipe, PROMPT, TOKENS, seeds=[0], config=defaults, **common).latents,
            "ae_low_memory": lambda: (
                generate(pipe, PROMPT, TOKENS, seeds=[0], config=no_refinement, low_memory=True, **common).latents
            ),
        }
        if fast_differs:  # the fast path against the eager one, on the same work
            programs["sd_eager"] = lambda: (
                generate(pipe, PROMPT, TOKENS, seeds=[0], config=None, fast=False, **common).latents
            )
            programs["ae_no_refinement_eager"] = lambda: (
                generate(pipe, PROMPT, TOKENS, seeds=[0], config=no_refinement, fast=False, **common).latents
            )
            programs["ae_low_memory_eager"] = lambda: (
                generate(
                    pipe, PROMPT, TOKENS, seeds=[0], config=no_refinement, fast=False, low_memory=True, **common
                ).latents
            )
        b = _alternate(programs, repeats, w.device, w.warmup)
        latents = {k: b[k].pop("result").double() for k in programs}
        held = {
            mode: _held_for_backward(pipe, no_refinement, low_memory=mode == "low_memory", **common)
            for mode in ("default", "low_memory")
        }
        sd_seconds = b["sd"]["seconds"]
        # a replayed CUDA graph allocates nothing, so the allocator's peak sees activations on the eager path only
        peak = {
            k: b[f"{k}_eager" if fast_differs else k]["peak_bytes"] for k in ("sd", "ae_no_refinement", "ae_low_memory")
        }
        results["b_vs_plain_sd"] = b | {
            "held_for_backward_bytes": held,
            "held_ratio_low_memory": held["low_memory"] / max(held["default"], 1),
            "low_memory_time_ratio": b["ae_low_memory"]["seconds"] / b["ae_no_refinement"]["seconds"],
            "memory_ratio_low_memory": peak["ae_low_memory"] / max(peak["sd"], 1),
            "low_memory_latent_difference": _relative(latents["ae_low_memory"], latents["ae_no_refinement"]),
            "ratio_no_refinement": b["ae_no_refinement"]["seconds"] / sd_seconds,
            "ratio_defaults": b["ae_defaults"]["seconds"] / sd_seconds,
            "memory_ratio_no_refinement": peak["ae_no_refinement"] / max(peak["sd"], 1),
            "sd_vs_diffusers": sd_seconds / b["diffusers_sd"]["seconds"],
            "ae_no_refinement_vs_diffusers": b["ae_no_refinement"]["seconds"] / b["diffusers_sd"]["seconds"],
            "sd_latent_difference_vs_diffusers": _relative(latents["sd"], latents["diffusers_sd"]),
        }
        if fast_differs:
            results["b_vs_plain_sd"] |= {
                "fast_sd_latent_difference": _relative(latents["sd"], latents["sd_eager"]),
                "fast_ae_latent_difference": _relative(latents["ae_no_refinement"], latents["ae_no_refinement_eager"]),
                "fast_sd_time_ratio": b["sd"]["seconds"] / b["sd_eager"]["seconds"],
                "fast_ae_time_ratio": b["ae_no_refinement"]["seconds"] / b["ae_no_refinement_eager"]["seconds"],
            }

    if "c" in comparisons:
        say(f"[{w.name}] (c) 8 seeds in one batch vs 8 single-seed runs ...")
        seeds = list(range(8))
        c = _alternate(
            {
                "batch_of_8": lambda: generate(pipe, PROMPT, TOKENS, seeds=seeds, config=no_refinement, **common),
                "8_single_runs": lambda: [
                    generate(pipe, PROMPT, TOKENS, seeds=[s], config=no_refinement, **common) for s in seeds
                ],
            },
            max(1, repeats // 2) if w.name.startswith("sd14") else repeats,
            w.device,
            w.warmup,
        )
        _drop_results(c)
        results["c_batching"] = c | {"throughput_gain": c["8_single_runs"]["seconds"] / c["batch_of_8"]["seconds"]}

    if "d" in comparisons:
        say(f"[{w.name}] (d) recording all resolutions vs none ...")
        d = _alternate(
            {
                "no_recording": lambda: generate(pipe, PROMPT, TOKENS, seeds=[0], config=no_refinement, **common),
                "record_all": lambda: generate(
                    pipe, PROMPT, TOKENS, seeds=[0], config=no_refinement, record=Record(), **common
                ),
            },
            repeats,
            w.device,
            w.warmup,
        )
        _drop_results(d)
        results["d_recording"] = d | {"ratio": d["record_all"]["seconds"] / d["no_recording"]["seconds"]}

    if "e" in comparisons:
        say(f"[{w.name}] (e) every method at its official defaults vs plain SD: {', '.join(chosen)} ...")
        runs = {"sd": dict(config=None)} | {name: dict(method=w.method(name)) for name in chosen}
        e = _alternate(
            {
                name: functools.partial(
                    generate, pipe, METHOD_PROMPT, seeds=[0], subjects=METHOD_SUBJECTS, **arguments, **common
                )
                for name, arguments in runs.items()
            },
            repeats,
            w.device,
            w.warmup,
        )
        _drop_results(e)
        results["e_methods"] = e | {
            "ratios": {name: e[name]["seconds"] / e["sd"]["seconds"] for name in chosen},
            "settings": {name: registry.spec(runs[name]["method"]) for name in chosen},
        }

    if "f" in comparisons:
        say(f"[{w.name}] (f) plain sampling vs the family's diffusers pipeline, and A&E vs plain ...")

        def run_diffusers():
            latents = pipe(
                PROMPT,
                generator=torch.Generator("cpu").manual_seed(0),
                num_inference_steps=w.steps,
                height=w.size,
                width=w.size,
                output_type="latent",
            ).images
            return (
                pipe._unpack_latents(latents, w.size, w.size, pipe.vae_scale_factor) if latents.ndim == 3 else latents
            )

        f = _alternate(
            {
                "diffusers": run_diffusers,
                "sd": lambda: generate(pipe, PROMPT, seeds=[0], **common).latents,
                "ae_defaults": lambda: generate(pipe, PROMPT, TOKENS, seeds=[0], config=defaults, **common).latents,
            },
            repeats,
            w.device,
            w.warmup,
        )
        mine, theirs = (f[k].pop("result").double() for k in ("sd", "diffusers"))
        f["ae_defaults"].pop("result")
        results["f_transformer"] = f | {
            "sd_vs_diffusers": f["sd"]["seconds"] / f["diffusers"]["seconds"],
            "ratio_ae_defaults": f["ae_defaults"]["seconds"] / f["sd"]["seconds"],
            "max_abs_latent_difference_vs_diffusers": (mine - theirs).abs().max().item(),
        }
    return _write(results, results_dir)


def _held_for_backward(pipe, config, low_memory: bool, **common) -> int:
    """Peak bytes autograd holds for A&E's backward over one run (:class:`anelab.memory.HeldForBackward`)."""
    with HeldForBackward(exclude=pipe.unet.parameters()) as held:  # eager: a replayed graph runs no autograd
        generate(pipe, PROMPT, TOKENS, seeds=[0], config=config, low_memory=low_memory, fast=False, **common)
    return held.peak


def _plain_diffusers(pipe):
    """diffusers' own ``StableDiffusionPipeline`` on the same components (the program users run today without guidance)."""
    from diffusers import StableDiffusionPipeline

    components = {
        k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    }
    plain = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    plain.set_progress_bar_config(disable=True)
    return plain


def _relative(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |mine − theirs| / max |theirs|."""
    return (mine - theirs).abs().max().item() / max(theirs.abs().max().item(), 1e-12)


def _drop_results(comparison: dict) -> None:
    for program in comparison.values():
        if isinstance(program, dict):
            program.pop("result")


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} cpu ({torch.get_num_threads()} threads)"


def _write(results: dict, results_dir: Path) -> dict:
    """Write ``results`` with the comparisons of an earlier file of the same workload and device kept; returns what was written."""

    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{results['workload']['name']}.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        if all(earlier.get(k) == results[k] for k in ("workload", "device")):
            results = {k: v for k, v in earlier.items() if k in COMPARISONS} | results
    results = {k: results[k] for k in ("workload", "device", *COMPARISONS) if k in results}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    return results


def table(results: dict) -> str:
    """The printed table of one workload's results."""
    mib = 2**20
    rows = []
    if "a_vs_diffusers_port" in results:
        a = results["a_vs_diffusers_port"]
        rows += [
            (
                "(a) anelab A&E, defaults",
                a["anelab"]["seconds"],
                a["anelab"]["peak_bytes"] / mib,
                f"{a['time_ratio']:.2f}x the port (target <= 0.5 CPU / 0.4 GPU)",
            ),
            (
                "(a) diffusers A&E port",
                a["diffusers_port"]["seconds"],
                a["diffusers_port"]["peak_bytes"] / mib,
                f"max |latent diff| {a['max_abs_latent_difference']:.2e} ({a['relative_latent_difference']:.1e} of max |latent|)",
            ),
        ]
    gpu = results["workload"]["device"].startswith("cuda")
    if "b_vs_plain_sd" in results:
        b = results["b_vs_plain_sd"]
        rows += (
            [
                (
                    "(b) diffusers StableDiffusionPipeline",
                    b["diffusers_sd"]["seconds"],
                    b["diffusers_sd"]["peak_bytes"] / mib,
                    "",
                )
            ]
            if "diffusers_sd" in b
            else []
        )
        rows += [
            (
                "(b) anelab plain SD",
                b["sd"]["seconds"],
                b["sd"]["peak_bytes"] / mib,
                f"{b['sd_vs_diffusers']:.2f}x diffusers (target <= 0.4 GPU); latents {b['sd_latent_difference_vs_diffusers']:.1e} rel."
                if "sd_vs_diffusers" in b
                else "",
            ),
            (
                "(b) A&E, refinement never triggered",
                b["ae_no_refinement"]["seconds"],
                b["ae_no_refinement"]["peak_bytes"] / mib,
                f"{b['ratio_no_refinement']:.2f}x anelab SD (target <= 1.5 GPU / 1.4 CPU)"
                + (
                    f", {b['ae_no_refinement_vs_diffusers']:.2f}x diffusers SD (target <= 0.7 GPU)"
                    if "ae_no_refinement_vs_diffusers" in b
                    else ""
                )
                + (f"; memory {b['memory_ratio_no_refinement']:.2f}x (target <= 1.5)" if gpu else ""),
            ),
            (
                "(b) A&E, default thresholds",
                b["ae_defaults"]["seconds"],
                b["ae_defaults"]["peak_bytes"] / mib,
                f"{b['ratio_defaults']:.2f}x SD",
            ),
        ]
        if "ae_low_memory" in b:
            held = b["held_for_backward_bytes"]
            rows.append(
                (
                    "(b) A&E no refinement, --low-memory",
                    b["ae_low_memory"]["seconds"],
                    b["ae_low_memory"]["peak_bytes"] / mib,
                    f"{b['low_memory_time_ratio']:.2f}x the time; held for the backward {held['default'] / mib:.0f} -> "
                    f"{held['low_memory'] / mib:.0f} MiB ({b['held_ratio_low_memory']:.2f}x)"
                    + (f"; memory {b['memory_ratio_low_memory']:.2f}x SD (target <= 1.5)" if gpu else "")
                    + f"; latents {b['low_memory_latent_difference']:.1e} rel.",
                )
            )
        for key, label in (
            ("sd_eager", "(b) anelab plain SD, eager (fast path off)"),
            ("ae_no_refinement_eager", "(b) A&E no refinement, eager"),
            ("ae_low_memory_eager", "(b) A&E no refinement, --low-memory, eager"),
        ):
            if key in b:
                which = {"sd_eager": "sd", "ae_no_refinement_eager": "ae"}.get(key)
                note = (
                    f"fast path: {b[f'fast_{which}_time_ratio']:.2f}x this time, latents differ by "
                    f"{b[f'fast_{which}_latent_difference']:.1e} rel."
                    if which
                    else ""
                )
                rows.append((label, b[key]["seconds"], b[key]["peak_bytes"] / mib, note))
    if "c_batching" in results:
        c = results["c_batching"]
        rows += [
            (
                "(c) 8 seeds, one batch",
                c["batch_of_8"]["seconds"],
                c["batch_of_8"]["peak_bytes"] / mib,
                f"{c['throughput_gain']:.2f}x throughput (target >= 2 GPU)",
            ),
            ("(c) 8 single-seed runs", c["8_single_runs"]["seconds"], c["8_single_runs"]["peak_bytes"] / mib, ""),
        ]
    if "d_recording" in results:
        d = results["d_recording"]
        rows += [
            ("(d) no recording", d["no_recording"]["seconds"], d["no_recording"]["peak_bytes"] / mib, ""),
            (
                "(d) recording 4 resolutions",
                d["record_all"]["seconds"],
                d["record_all"]["peak_bytes"] / mib,
                f"{d['ratio']:.2f}x (target <= 1.15 CPU / 1.1 GPU)",
            ),
        ]
    if "e_methods" in results:
        e = results["e_methods"]
        rows.append(("(e) plain SD", e["sd"]["seconds"], e["sd"]["peak_bytes"] / mib, METHOD_PROMPT))
        rows += [
            (f"(e) {name}, official defaults", e[name]["seconds"], e[name]["peak_bytes"] / mib, f"{ratio:.2f}x SD")
            for name, ratio in e["ratios"].items()
        ]
    if "f_transformer" in results:
        f = results["f_transformer"]
        rows += [
            (
                "(f) the family's diffusers pipeline",
                f["diffusers"]["seconds"],
                f["diffusers"]["peak_bytes"] / mib,
                "",
            ),
            (
                "(f) anelab, no guidance",
                f["sd"]["seconds"],
                f["sd"]["peak_bytes"] / mib,
                f"{f['sd_vs_diffusers']:.2f}x diffusers, max |latent diff| {f['max_abs_latent_difference_vs_diffusers']:.1e}",
            ),
            (
                "(f) anelab A&E, defaults",
                f["ae_defaults"]["seconds"],
                f["ae_defaults"]["peak_bytes"] / mib,
                f"{f['ratio_ae_defaults']:.2f}x no guidance",
            ),
        ]
    w = results["workload"]
    runs = ", ".join(f"{key[0]} {results[key]['repeats']}" for key in COMPARISONS if key in results)
    head = f"workload {w['name']}: {results['device']}, {w['size']} px, {w['steps']} steps, {w['dtype']}, medians of runs ({runs})"
    if not w["device"].startswith("cuda"):
        head += "\n(peak MiB on the CPU: process RSS growth, sampled; the allocator reuses freed memory, so small runs read ~0)"
    lines = [head, f"{'program':44s} {'s/run':>8s} {'peak MiB':>9s}  note"]
    lines += [f"{name:44s} {sec:8.2f} {mem:9.0f}  {note}" for name, sec, mem, note in rows]
    return "\n".join(lines)
