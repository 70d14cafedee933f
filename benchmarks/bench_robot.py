"""Meta-World rendering and stepping speed on this machine (what `toto robot collect` / `eval` cost).

Per CortexBench task, in one run: offscreen frames/s at 128 px with MuJoCo's default scene
(shadows, reflections) vs ours (both off, toto.robot.env), the ratio, and scripted-expert
steps/s with and without rendering. Wall and CPU-time rates both: on a shared CPU the CPU-time
rate is what one free core would give.

    MUJOCO_GL=egl python -m benchmarks.bench_robot [--quick]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

from benchmarks.common import base_parser, markdown_table, setup, write_results  # noqa: E402


def _rate(fn, n: int) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t), n / max(time.process_time() - c, 1e-9)


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    device = setup(args)
    import mujoco

    from toto.robot.env import CORTEXBENCH_TASKS, MetaWorldTask

    n = 20 if args.quick else 60
    rows, records = [], []
    for task in CORTEXBENCH_TASKS:
        env = MetaWorldTask(task)
        env.reset(0)
        ours = _rate(env.render, n)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            env.renderer.scene.flags[flag] = 1
        default = _rate(env.render, n)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            env.renderer.scene.flags[flag] = 0
        env.reset(0)
        physics = _rate(lambda: env.env.step(env.expert_action()), n)  # expert + physics, no frame
        env.reset(1)
        full = _rate(lambda: env.step(env.expert_action()), n)  # what collect does per step
        env.close()
        rec = {"task": task, "render_fps_default": default[0], "render_fps_ours": ours[0],
               "render_cpu_fps_default": default[1], "render_cpu_fps_ours": ours[1],
               "expert_steps_per_s_no_render": physics[0], "expert_steps_per_s": full[0],
               "expert_cpu_steps_per_s": full[1]}
        records.append(rec)
        rows.append([task, f"{default[0]:.1f} ({default[1]:.1f})", f"{ours[0]:.1f} ({ours[1]:.1f})",
                     f"{ours[0] / default[0]:.1f}x", f"{physics[0]:.0f}", f"{full[0]:.1f} ({full[1]:.1f})"])
    cols = ["task", "render fps, default scene (CPU-time fps)", "render fps, ours", "ours / default",
            "expert steps/s, no render", "expert steps/s with 128 px frames"]
    table = {"title": "Meta-World v3, 128 px offscreen (MUJOCO_GL=" + os.environ["MUJOCO_GL"] + ")",
             "columns": cols, "rows": rows,
             "notes": "ours = shadows and reflections off; CPU-time rates in parentheses"}
    write_results("bench_robot", device, [table], records, args.out)
    print(markdown_table(cols, rows))


if __name__ == "__main__":
    main()
