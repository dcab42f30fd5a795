"""The prepared check for a machine with a CUDA GPU (one run, about 5-8 minutes on an H100/H200).

    python benchmarks/gpu_check.py            # placement, fp16 guided and recorded images, CUDA generator, fast path,
                                              # the SD-3-size transformer: plain vs A&E, time and memory
    python benchmarks/gpu_check.py --bench    # and then `anelab bench --workload sd14-gpu` (table + benchmarks/results/sd14-gpu.json)

It prints what it finds; a failed check prints FAIL and the script exits 1 at the end.
"""

from __future__ import annotations

import sys
import time

import torch

import anelab
from anelab.loading import pipeline_modules
from anelab.stand_ins import sd14_sized_pipeline

FAILED = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def main() -> None:
    assert torch.cuda.is_available(), "this script needs a CUDA GPU"
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)

    # 1. placement: every module of the tiny pipeline and of the SD-1.4-size one on the GPU
    tiny = anelab.load_pipeline("tiny", device="cuda", dtype="fp16")
    devices = {name: sorted({str(p.device) for p in m.parameters()}) for name, m in pipeline_modules(tiny).items()}
    check(
        "load_pipeline('tiny', device='cuda') places every module",
        all(d == ["cuda:0"] for d in devices.values()),
        str(devices),
    )
    big = sd14_sized_pipeline(device="cuda", dtype=torch.float16)
    big = anelab.load_pipeline(big, device="cuda")
    devices = {name: sorted({str(p.device) for p in m.parameters()}) for name, m in pipeline_modules(big).items()}
    check("the SD-1.4-size pipeline on cuda", all(d == ["cuda:0"] for d in devices.values()), str(devices))
    fmt = next(m for m in big.unet.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous(
        memory_format=torch.channels_last
    )
    check("fast path: UNet convolutions channels-last on CUDA", fmt)

    # 2. one guided image and one recorded image in fp16, 512 px, 50 steps
    for label, record in (("guided", None), ("guided + recorded", anelab.Record(maps=True))):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = anelab.generate(
            big,
            "a cat and a dog",
            ["cat", "dog"],
            seeds=[0],
            config=anelab.GuidanceConfig(),
            record=record,
            progress=False,
        )
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        trace = out.trace
        detail = (
            f"{seconds:.2f} s, latents {tuple(out.latents.shape)} on {out.latents.device} {out.latents.dtype}, "
            f"{len(trace)} trace rows, triggered {int(trace.drop_duplicates(['seed', 'step']).triggered.sum())}, nonfinite {bool(trace.nonfinite.any())}"
        )
        if record is not None:
            detail += f", recorded {len(out.attention)} maps ({out.attention.nbytes / 2**20:.1f} MiB) at {out.attention.resolutions}"
        check(
            f"fp16 {label} image",
            out.latents.device.type == "cuda" and torch.isfinite(out.latents).all().item(),
            detail,
        )

    # 3. the official code's noise: generator_device="cuda", a batch equals single-seed runs
    one = dict(config=None, num_inference_steps=2, output_type="latent", progress=False)
    batch = anelab.generate(tiny, "a cat", seeds=[21, 42], generator_device="cuda", **one).latents
    singles = torch.cat(
        [anelab.generate(tiny, "a cat", seeds=[s], generator_device="cuda", **one).latents for s in (21, 42)]
    )
    check(
        "generator_device='cuda': batch == single seeds",
        torch.allclose(batch, singles, atol=1e-3),
        f"max |diff| {(batch - singles).abs().max().item():.2e}",
    )

    # 4. fast path (CUDA graphs of the CFG forward and of the guided step) against eager: plain SD, A&E without
    # refinement, A&E at the defaults (refinement at threshold steps), and the low-memory guided backward
    refining = anelab.GuidanceConfig()
    for label, config in (
        ("plain SD", None),
        ("A&E, no refinement", anelab.GuidanceConfig(thresholds={})),
        ("A&E, defaults", refining),
    ):
        kwargs = dict(seeds=[0], config=config, output_type="latent", progress=False)
        times = {}
        latents = {}
        for fast in (True, False, True, False):
            torch.cuda.synchronize()
            start = time.perf_counter()
            latents[fast] = anelab.generate(big, "a cat and a dog", ["cat", "dog"], fast=fast, **kwargs).latents.float()
            torch.cuda.synchronize()
            times[fast] = time.perf_counter() - start
        difference = (latents[True] - latents[False]).abs().max().item() / latents[False].abs().max().item()
        check(
            f"fast path == eager ({label})",
            difference < 1e-2,
            f"rel. diff {difference:.1e}; {times[True]:.2f} s fast vs {times[False]:.2f} s eager",
        )
    graphs = big.unet.__dict__.get("_anelab_graphs")
    kinds = sorted({key[0] for key in graphs.graphs}) if graphs else []
    check(
        "CUDA graphs captured for the CFG forward and the guided step",
        kinds == ["CFG forward", "guided step"] and not graphs.broken,
        f"kinds {kinds}, capture failure: {graphs.broken if graphs else '-'}",
    )
    traces = {
        f: anelab.generate(big, "a cat and a dog", ["cat", "dog"], seeds=[0], config=refining, fast=f, progress=False)
        .trace.drop_duplicates(["seed", "step"])
        .set_index("step")
        for f in (True, False)
    }
    decisions = ["triggered", "refinement_iterations"]
    check(
        "fast path: the same refinement decisions as eager (defaults)",
        traces[True][decisions].equals(traces[False][decisions]),
        f"iterations per threshold step {traces[True].refinement_iterations[traces[True].triggered].to_dict()}",
    )
    for low in (False, True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = anelab.generate(
            big,
            "a cat and a dog",
            ["cat", "dog"],
            seeds=[0],
            config=anelab.GuidanceConfig(thresholds={}),
            low_memory=low,
            output_type="latent",
            progress=False,
        )
        torch.cuda.synchronize()
        print(
            f"     low_memory={low}: {time.perf_counter() - start:.2f} s, "
            f"peak {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB above the weights",
            flush=True,
        )

    # 5. the SD-3-medium-size random transformer (2B parameters) at 1024 px, 28 steps, fp16: plain vs A&E (thresholds
    # placed by noise level), A&E with low memory; time and peak memory above the weights
    del big, tiny
    torch.cuda.empty_cache()
    from anelab.stand_ins import sd3_sized_pipeline

    sd3 = sd3_sized_pipeline(device="cuda", dtype=torch.float16)
    sd3 = anelab.load_pipeline(sd3, device="cuda")
    runs = {
        "SD 3 size, plain": dict(config=None),
        "SD 3 size, A&E (thresholds by sigma)": dict(config=anelab.GuidanceConfig(), thresholds="sigma"),
        "SD 3 size, A&E, low memory": dict(config=anelab.GuidanceConfig(), thresholds="sigma", low_memory=True),
    }
    seconds = {}
    for label, options in runs.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = anelab.generate(
            sd3, "a cat and a dog", ["cat", "dog"], seeds=[0], output_type="latent", progress=False, **options
        )
        torch.cuda.synchronize()
        seconds[label] = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        check(
            label,
            torch.isfinite(out.latents).all().item(),
            f"{seconds[label]:.2f} s/image ({seconds[label] / seconds['SD 3 size, plain']:.2f}x plain), peak {peak:.0f} MiB above the weights",
        )

    if "--bench" in sys.argv:
        from anelab.bench import run_bench, table

        print(table(run_bench("sd14-gpu")), flush=True)
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
