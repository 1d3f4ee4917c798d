"""Fault campaign: kill a 2-rank `deepspeed` training run at seeded random moments, resume, compare losses.

    python benchmarks/fault_campaign.py                      # 20 SIGKILL + 3+4 SIGTERM, writes the JSON below
    python benchmarks/fault_campaign.py --kills 6 --terms 1 --out /tmp/fc.json    # a quick one
    python benchmarks/fault_campaign.py --only sigterm       # the SIGTERM points alone, merged into the JSON

Kill points are drawn with a seeded RNG from every phase of the run -- data loading, the step, each phase of
a sync and of an async save (begin, snapshot, write, between files, after the files, before meta.json, before
`latest`), the safetensors export, sampling during training -- on either rank (vgen.train.durable's fault
points SIGKILL the process from inside, so the moment is exact); a few more are SIGKILLs of the whole job
after a seeded random delay. SIGTERMs (preemption) are sent at seeded points too (VGEN_FAULT_TERM: a phase,
a step before the last, rank 0, 1 or all), so they land mid-training -- a wall-clock delay often landed
after the run's last checkpoint -- and `--shutdown-terms` more land after the last checkpoint, during the
shutdown (barrier, loader close, process-group teardown, exit), which must end with status 0. To keep the
launches few, the points are strung into chains: one run directory per chain, each resume armed with the
chain's next point (its step later than where the previous point stopped the run, so it fires).

`--only sigkill|sigterm` runs one part and merges its records into an existing JSON, keeping the other
part's records; every record names the run ("runs": command, commit, time) that produced it.

After every kill the campaign checks the run directory as a resume would see it: every checkpoint marked
complete (meta.json) must pass its checksums, and `latest` must name one. After every resume it compares the
losses that resume logged with the uninterrupted run's: bitwise. JSON: benchmarks/results/fault_campaign.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from e2e_utils import DEEPSPEED, TINY, children, demo_shards, env, free_port, losses  # noqa: E402

# Note: a point can only fire if the run reaches it; "fired" in the JSON says whether it did.

MAX_STEPS, EVERY, SAMPLE_EVERY = 10, 2, 4
SAVE_PHASES = ["ckpt_begin", "ckpt_snapshot", "ckpt_write", "ckpt_write_mid", "ckpt_rank_files",
               "ckpt_before_meta", "ckpt_before_latest", "export"]
RANK0_ONLY = {"ckpt_before_meta", "ckpt_before_latest", "export"}  # rank 0 alone runs these
STEP_PHASES = ["data", "step"]
TERM_PHASES = ["data", "step", "ckpt_write", "sample", "export"]  # SIGTERM mid-training
SHUTDOWN_PHASES = ["shutdown_barrier", "shutdown_loader", "shutdown_destroy", "exit"]  # after the last save


def common(shards: Path, run: Path, mode: str) -> list[str]:
    return TINY + [f"data.path={shards}", f"run.dir={run}", f"train.max_steps={MAX_STEPS}",
                   f"checkpoint.every_steps={EVERY}", f"checkpoint.async={'true' if mode == 'async' else 'false'}",
                   f"sample.every_steps={SAMPLE_EVERY}", "sample.steps=2", "sample.prompts=[a red circle]",
                   "train.collective_timeout_s=120"]


def draw_points(rng: random.Random, kills: int, terms: int, shutdown_terms: int = 0) -> list[dict]:
    """The campaign's kill points: phase x mode x step x rank, plus timed SIGKILLs and SIGTERM points.

    The SIGKILL draws are those of the first committed campaign for the same seed (the SIGTERMs' modes are
    drawn where they were; their phase, step and rank replace its wall-clock delay, drawn last)."""
    pool = [{"kind": "point", "phase": p, "mode": m} for p in SAVE_PHASES for m in ("sync", "async")]
    pool += [{"kind": "point", "phase": p, "mode": rng.choice(["sync", "async"])} for p in STEP_PHASES + ["sample"]]
    rng.shuffle(pool)
    timed = max(0, kills - len(pool))
    points = pool[:kills] + [{"kind": "timed_kill", "mode": rng.choice(["sync", "async"])} for _ in range(timed)]
    points += [{"kind": "sigterm", "mode": rng.choice(["sync", "async"])} for _ in range(terms)]
    for p in points:
        if p["kind"] == "point":
            steps = {"sample": range(SAMPLE_EVERY, MAX_STEPS + 1, SAMPLE_EVERY)}.get(
                p["phase"], range(EVERY, MAX_STEPS + 1, EVERY) if p["phase"] in SAVE_PHASES + ["export"] else range(1, MAX_STEPS + 1))
            p["step"] = rng.choice(list(steps))
            p["rank"] = 0 if p["phase"] in RANK0_ONLY else rng.choice([0, 1])
        elif p["kind"] == "timed_kill":
            p["delay_s"] = round(rng.uniform(0.5, 4.0), 2)  # after the segment's first logged step
    for p in points:
        if p["kind"] == "sigterm":
            p["phase"] = rng.choice(TERM_PHASES)
            last = MAX_STEPS - 3  # leaves room for a save-phase SIGTERM to stop the run before its end
            steps = {"sample": range(SAMPLE_EVERY, last + 1, SAMPLE_EVERY), "data": range(1, last + 1),
                     "step": range(1, last + 1)}.get(p["phase"], range(EVERY, last + 1, EVERY))
            p["step"] = rng.choice(list(steps))
            p["rank"] = 0 if p["phase"] in RANK0_ONLY else rng.choice([0, 1, "all"])
    for _ in range(shutdown_terms):
        points.append({"kind": "sigterm_shutdown", "mode": rng.choice(["sync", "async"]),
                       "phase": rng.choice(SHUTDOWN_PHASES), "step": MAX_STEPS, "rank": rng.choice([0, 1, "all"])})
    return points


def stops_at(p: dict) -> int:
    """The last step a point's launch can reach: a SIGTERM in a save, sample or export stops the run at a
    later step boundary (an async save's background write may take a few steps)."""
    if p["kind"] == "sigterm" and p["phase"] not in STEP_PHASES:
        return p["step"] + EVERY + 1
    return p["step"]


def chains(points: list[dict], per_chain: int) -> list[list[dict]]:
    """Group points of one mode into chains whose fault steps increase; the timed kills of a mode form a
    chain of their own (where they land is not known in advance)."""
    out = []
    for mode in ("sync", "async"):
        mine = [p for p in points if p["mode"] == mode]
        fixed = sorted((p for p in mine if p["kind"] != "timed_kill"), key=lambda p: p["step"])
        timed = [p for p in mine if p["kind"] == "timed_kill"]
        while fixed:
            chain, last = [], 0
            for p in list(fixed):
                # a shutdown point also fires in a resume that has nothing left to train: they can follow
                # one another at the last step
                follows = p["step"] > last or (p["kind"] == "sigterm_shutdown" and p["step"] == last)
                if follows and len(chain) < per_chain:
                    chain.append(p)
                    fixed.remove(p)
                    last = stops_at(p)
            out.append(chain)
        if timed:
            out.append(timed)
    return out


def launch(args: list[str], fault: dict | None, log: Path) -> tuple[int, str]:
    """Run the 2-rank job once with `fault` armed; returns (exit status, output)."""
    e = env()
    if fault and fault["kind"] == "point":
        e["VGEN_FAULT"] = f"{fault['phase']}:{fault['step']}:{fault['rank']}"
    if fault and fault["kind"].startswith("sigterm"):
        e["VGEN_FAULT_TERM"] = f"{fault['phase']}:{fault['step']}:{fault['rank']}"
    cmd = [DEEPSPEED, "--num_gpus=2", f"--master_port={free_port()}", str(ROOT / "launch" / "train.py")] + args
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if fault and fault["kind"] == "timed_kill":
            _signal_later(proc, log, fault)
        try:
            proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text()


def _signal_later(proc: subprocess.Popen, log: Path, fault: dict) -> None:
    while proc.poll() is None and not re.search(r"step \d+/", log.read_text()):
        time.sleep(0.2)
    time.sleep(fault["delay_s"])
    for pid in [proc.pid] + children(proc.pid):  # the whole job at once, as a lost node would
        _send(pid, signal.SIGKILL)


def _send(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def read_losses(run: Path) -> dict[int, float]:
    """metrics.jsonl's losses; a line torn by the kill is skipped (the next resume rewrites the file)."""
    path, out = run / "metrics.jsonl", {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[row["step"]] = row["loss"]
    return out


def audit(run: Path) -> dict:
    """What a resume would find: complete checkpoints, which of them fail checksums, what `latest` names."""
    from vgen.train.durable import find_bad_file

    ckpt = run / "checkpoints"
    complete = sorted(p.name for p in ckpt.glob("step*") if (p / "meta.json").is_file()) if ckpt.is_dir() else []
    corrupt = [t for t in complete if find_bad_file(ckpt / t, json.loads((ckpt / t / "meta.json").read_text())["files"])]
    latest = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else None
    return {"complete": complete, "corrupt_complete": corrupt, "latest": latest,
            "latest_ok": latest is None or (latest in complete and latest not in corrupt),
            "incomplete": sorted(p.name for p in ckpt.glob("step*") if not (p / "meta.json").is_file()) if ckpt.is_dir() else []}


def run_chain(i: int, chain: list[dict], shards: Path, work: Path, reference: dict) -> list[dict]:
    mode = chain[0]["mode"]
    run = work / f"chain{i:02d}"
    records = []
    for j, fault in enumerate(chain + [None]):
        code, out = launch(common(shards, run, mode), fault, work / f"chain{i:02d}_{j}.log")
        resumed = next((line.split("resumed from ")[1] for line in out.splitlines() if "resumed from " in line), None)
        now = read_losses(run)  # the resume truncated what came after its checkpoint: all of it must match
        mismatched = [s for s, v in now.items() if reference.get(s) != v]
        kind = (fault or {}).get("kind")
        fired = {"sigterm": "on SIGTERM" in out, "sigterm_shutdown": "SIGTERM during shutdown" in out}.get(kind, code != 0)
        rec = {"fault": fault, "exit": code, "fired": fired,
               "resumed_from": resumed, "steps_logged": sorted(now), "loss_mismatches": mismatched, "after": audit(run)}
        if records:
            records[-1]["resume"] = {"resumed_from": resumed, "loss_mismatches": mismatched, "exit": code}
        if fault is not None:
            records.append(rec)
        print(f"chain {i} [{mode}] {fault} -> exit {code}, resumed from {resumed}, mismatches {mismatched}, "
              f"audit {rec['after']}", flush=True)
    final = read_losses(run)
    for r in records:
        r["final_curve_bitwise"] = final == reference
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--terms", type=int, default=3, help="SIGTERMs mid-training")
    p.add_argument("--shutdown-terms", type=int, default=4, help="SIGTERMs after the last checkpoint")
    p.add_argument("--only", choices=["all", "sigkill", "sigterm"], default="all",
                   help="run one part; its records replace that part's in --out, the other part's are kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-chain", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2, help="chains run at the same time")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_campaign.json"))
    args = p.parse_args()
    points = [p for p in draw_points(random.Random(args.seed), args.kills, args.terms, args.shutdown_terms)
              if args.only == "all" or (args.only == "sigterm") == p["kind"].startswith("sigterm")]
    run = {"id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "command": " ".join([sys.executable] + sys.argv),
           "commit": _commit(), "part": args.only, "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, shared)",
           "settings": {**vars(args), "max_steps": MAX_STEPS, "checkpoint_every": EVERY, "sample_every": SAMPLE_EVERY,
                        "ranks": 2, "launcher": "deepspeed"}}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="vgen-fault-") as tmp:
        work = Path(tmp)
        shards = demo_shards(work / "shards")
        code, out = launch(common(shards, work / "reference", "sync"), None, work / "reference.log")
        assert code == 0, out[-3000:]
        run["reference_losses"] = {str(k): v for k, v in losses(work / "reference").items()}
        reference = losses(work / "reference")
        todo = chains(points, args.per_chain)
        done: list[list[dict]] = []
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_chain, i, c, shards, work, reference) for i, c in enumerate(todo)]
            for f in as_completed(futures):
                done.append(f.result())
                write(args, run, start, [r for rs in done for r in rs], len(todo) - len(done))
        records = [r for rs in done for r in rs]
    write(args, run, start, records, 0)


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "vgen", "launch", "benchmarks/fault_campaign.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head + ("+uncommitted changes" if dirty else "")


def _part(record: dict) -> str:
    return "sigterm" if record["fault"]["kind"].startswith("sigterm") else "sigkill"


def _previous(path: Path) -> dict:
    """An existing campaign JSON in the current layout ("runs" + records naming their run)."""
    if not path.is_file():
        return {"runs": [], "kills": [], "superseded": []}
    old = json.loads(path.read_text())
    if "runs" in old:
        return old
    # the first layout: one run at top level; its wall-clock SIGTERMs (kind "sigterm" with a delay) are kept
    # as superseded once a seeded SIGTERM run replaces them
    rid = "first"
    run = {"id": rid, "command": old["command"], "commit": old["commit"], "part": "all", "device": old["device"],
           "settings": old["settings"], "reference_losses": old["reference_losses"], "summary": old["summary"]}
    for r in old["kills"]:
        r["run"] = rid
        if r["fault"]["kind"] == "sigterm" and "delay_s" in r["fault"]:
            r["fault"]["kind"] = "sigterm_timed"
    return {"runs": [run], "kills": old["kills"], "superseded": []}


def summarize(records: list[dict]) -> dict:
    def ok(r: dict) -> bool:
        clean = r["exit"] == 0 if r["fault"]["kind"].startswith("sigterm") else True  # preemption exits 0
        return (r["final_curve_bitwise"] and not r["after"]["corrupt_complete"] and r["after"]["latest_ok"]
                and not r.get("resume", {}).get("loss_mismatches") and clean)

    kinds = [r["fault"]["kind"] for r in records]
    return {"sigkill_points": sum(k in ("point", "timed_kill") for k in kinds),
            "sigterm_points": kinds.count("sigterm"), "sigterm_shutdown_points": kinds.count("sigterm_shutdown"),
            "fired": sum(bool(r["fired"]) for r in records), "resumed_bitwise_and_clean": sum(map(ok, records)),
            "total": len(records),
            "not_fired": [r["fault"] for r in records if not r["fired"]],
            "corrupt_or_incomplete_selected": sum(bool(r["after"]["corrupt_complete"]) or not r["after"]["latest_ok"]
                                                  for r in records)}


def write(args, run: dict, start: float, records: list[dict], chains_left: int) -> None:
    """The JSON, rewritten after every chain (a campaign cut short still leaves what it measured). With
    --only, the other part's records (and the runs that made them) are kept from the existing file."""
    path = Path(args.out)
    prev = _previous(path) if args.only != "all" else {"runs": [], "kills": [], "superseded": []}
    prev["runs"] = [r for r in prev["runs"] if r["id"] != run["id"]]
    prev["kills"] = [r for r in prev["kills"] if r["run"] != run["id"]]  # this run's own earlier write
    kept = [r for r in prev["kills"] if args.only != "all" and _part(r) != args.only]
    replaced = [r for r in prev["kills"] if args.only != "all" and _part(r) == args.only]
    for r in records:
        r["run"] = run["id"]
    run = {**run, "wall_s": round(time.time() - start, 1), "chains_left": chains_left, "summary": summarize(records)}
    runs = [r for r in prev["runs"] if any(k["run"] == r["id"] for k in kept + replaced + prev["superseded"])] + [run]
    all_records = kept + records
    same = all(r["reference_losses"] == run["reference_losses"] for r in runs)
    note = ("each record is compared, bitwise, with the uninterrupted reference run of its own campaign run "
            "(same commit); references of runs at different commits differ where the training code changed")
    # the newest run's provenance at the top; every record names its own run in "runs"
    result = {"device": run["device"], "command": run["command"], "git_commit": run["commit"],
              "summary": {**summarize(all_records), "reference_losses_bitwise_equal_across_runs": same}, "note": note,
              "runs": runs, "reference_losses": run["reference_losses"], "kills": all_records,
              "superseded": prev["superseded"] + [{**r, "superseded_by": run["id"]} for r in replaced]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"]), "->", path, flush=True)


if __name__ == "__main__":
    main()
