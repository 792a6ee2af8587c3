"""Reading a run's attacks back: the summary table and the persistence figure.

    python -m oml.lab.persistence_report results/<hash>                 # print the table, write attacks/summary.md and
                                                             # attacks/persistence.png
    python -m oml.lab.persistence_report results/<hash> --fig fig/persistence.png
    python -m oml.lab.persistence_report results/<hash1> results/<hash2> ...   # several runs: which recipe keeps the most

Rows come from results/<hash>/attacks/*/attack.json and eval_results.json; the first row is the fingerprinted model
itself (the run's eval_results.json) when it was evaluated. Given several runs, one table instead: a row per run
(the recipe settings that differ between them, its plain-key accuracy) and a column per attack with the plain-key
accuracy after it (and, where both evaluations kept their per-key misses, the share of the run's own answered keys
that the attacked copy still answers), written to --out (default: printed only).
"""

import argparse
from pathlib import Path

from oml.core.errors import UserError, run_cli
from oml.core.run_config import recorded_settings
from oml.core.run_store import ATTACK, ATTACKS, CONFIG, EVAL_RESULTS, read_json
from oml.measure.evaluation import accuracy_split

SUMMARY = "summary.md"
FIGURE = "persistence.png"


def read_attacks(run):
    """[{"id", "record", "eval"}] for every made attack of the run, in the order of their ids."""
    out = []
    for path in sorted((Path(run) / ATTACKS).glob(f"*/{ATTACK}")):
        record = read_json(path)
        if record is not None:
            out.append({"id": path.parent.name, "record": record, "eval": read_json(path.parent / EVAL_RESULTS)})
    return out


def describe(record):
    kind = record.get("attack")
    if kind in ("sft", "lora_sft"):
        return f"{record['examples']} ex x {record['epochs']} ep, lr {record['learning_rate']:g}"
    if kind == "quantize":
        return f"{record['quantization']} ({record.get('runtime', '').split(' ')[0]})"
    if kind == "merge":
        return f"w {record['merge_weight']:g} with {record.get('merge_with_run') or record.get('merge_with')}"
    return ""


def plain_misses(results):
    """The indices of the plain keys that did not answer, or None (no evaluation, or one from before they were kept)."""
    for t in (results or {}).get("fingerprint_accuracy", {}).get("templates", []):
        if t["template"] == "{}" and "missed" in t:
            return set(t["missed"])
    return None


def kept(own, attacked, n):
    """The share of the keys the fingerprinted model answers (plain) that the attacked copy still answers: retention
    key by key, which plain accuracy after the attack only bounds. None where either side lacks per-key misses."""
    before, after = plain_misses(own), plain_misses(attacked)
    if before is None or after is None or n is None or len(before) >= n:
        return None
    return sum(1 for i in range(n) if i not in before and i not in after) / (n - len(before))


def summary_rows(run):
    rows = []
    own = read_json(Path(run) / EVAL_RESULTS)
    if own:
        rows.append(_row("(fingerprinted model)", "none", "", own, own))
    for a in read_attacks(run):
        rows.append(_row(a["id"], a["record"].get("attack"), describe(a["record"]), a["eval"], own))
    return rows


def _row(name, kind, detail, results, own=None):
    row = {"id": name, "attack": kind, "detail": detail, "plain": None, "templates": None, "kept": None}
    row.update(answered=None, other_owner=None, utility=None, delta=None, cost=None, alias=None, kl=None)
    if not results:
        return row
    row["plain"], row["templates"] = accuracy_split(results)
    row["kept"] = kept(own, results, results.get("num_fingerprints"))
    row["answered"] = (results.get("chat") or {}).get("answered")
    other = results.get("other_owner")
    if other:
        row["other_owner"] = accuracy_split(other)[0]
    utility = results.get("utility") or {}
    row["utility"] = utility.get("mean")
    if "delta" in utility:
        row["delta"] = (utility["delta"], utility["delta_stderr"])
    row["cost"] = utility_cost(results, own) if results is not own else None
    generation = results.get("generation") or {}
    if "alias_in_answer_delta" in generation:
        row["alias"] = (generation["alias_in_answer_delta"], generation["alias_in_answer_delta_stderr"])
    drift = results.get("chat_drift") or {}
    if "kl" in drift:
        row["kl"] = (drift["kl"], drift["kl_stderr"])
    return row


def utility_cost(attacked, own):
    """What the attack cost the attacker: the attacked model's utility minus the fingerprinted model's, paired item
    by item (same tasks, same items), with its standard error; None where either lacks per-item results or the two
    were scored on different items."""
    from oml.measure.likelihood_benchmarks import paired_delta

    after, before = ((r or {}).get("utility") or {} for r in (attacked, own))
    if not after.get("per_item") or not before.get("per_item"):
        return None
    try:
        return paired_delta(after["per_item"], before["per_item"])
    except ValueError:  # another --utility_limit or task list
        return None


def pct(x):
    return "" if x is None else f"{x:.1%}"


def format_summary(rows):
    def points(x):  # (difference, stderr) as fractions -> "+1.2 ± 0.8" points
        return "" if x is None else f"{100 * x[0]:+.1f} ± {100 * x[1]:.1f}"

    def nats(x):
        return "" if x is None else f"{x[0]:.3f} ± {x[1]:.3f}"

    lines = [
        "| attack | settings | plain keys | run's keys kept | test prompts (mean) | other owner's keys | chat answered "
        "| utility | Δ vs base (points) | Δ vs fingerprinted model (points) | alias-in-answer Δ vs base | chat KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        utility = "" if r["utility"] is None else f"{r['utility']:.3f}"
        lines.append(
            f"| {r['id']} | {r['detail']} | {pct(r['plain'])} | {pct(r['kept'])} | {pct(r['templates'])} | "
            f"{pct(r['other_owner'])} | {pct(r['answered'])} | {utility} | {points(r['delta'])} | "
            f"{points(r['cost'])} | {points(r['alias'])} | {nats(r['kl'])} |"
        )
    return "\n".join(lines)


def plot_persistence(run, path):
    """Three panels: retention against examples seen (fine-tuning), accuracy per quantization, accuracy against the
    merge weight. Plain-key accuracy as solid marks, the mean over the test prompts as open ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = read_attacks(run)  # the retention curve is in attack.json: fine-tuning attacks need no evaluation
    attacks = [a for a in every if a["eval"]]
    own = read_json(Path(run) / EVAL_RESULTS)
    fig, (ax_ft, ax_q, ax_m) = plt.subplots(1, 3, figsize=(15, 4.2))

    for a in every:
        r = a["record"]
        if r.get("attack") in ("sft", "lora_sft") and r.get("retention"):
            xs = [p["examples_seen"] for p in r["retention"]]
            ys = [p["accuracy"] for p in r["retention"]]
            ax_ft.plot(xs, ys, marker="o", label=f"{'LoRA' if r['attack'] == 'lora_sft' else 'full'}, {describe(r)}")
    ax_ft.set(xlabel="fine-tuning examples seen", ylabel="fingerprints retained (plain keys)", ylim=(-0.02, 1.02))
    ax_ft.set_title("fine-tuning on benign QA")

    quant = [a for a in attacks if a["record"].get("attack") == "quantize"]
    order = ["none", "bf16", "fp16", "int8", "q8_0", "q4_k_m", "q4_0"]
    bars = ([("none (fp32)", own)] if own else []) + sorted(
        ((a["record"]["quantization"], a["eval"]) for a in quant), key=lambda t: order.index(t[0])
    )
    for i, (_, results) in enumerate(bars):
        plain, prompted = accuracy_split(results)
        ax_q.bar(i - 0.2, plain, 0.4, color="C0", label="plain keys" if i == 0 else None)
        if prompted is not None:
            ax_q.bar(i + 0.2, prompted, 0.4, color="C1", label="test prompts (mean)" if i == 0 else None)
    ax_q.set_xticks(range(len(bars)), [label for label, _ in bars])
    ax_q.set(ylabel="fingerprint accuracy", ylim=(0, 1.05), title="quantization (GGUF types checked in llama.cpp)")

    merges = sorted(
        (a for a in attacks if a["record"].get("attack") == "merge"), key=lambda a: a["record"]["merge_weight"]
    )
    partners = sorted({a["record"].get("merge_with_run") or a["record"].get("merge_with") for a in merges})
    for j, partner in enumerate(partners):
        group = [a for a in merges if (a["record"].get("merge_with_run") or a["record"].get("merge_with")) == partner]
        points = [(a["record"]["merge_weight"], accuracy_split(a["eval"])[0]) for a in group]
        if own:  # weight 1 is the fingerprinted model itself
            points.append((1.0, accuracy_split(own)[0]))
        ax_m.plot(*zip(*points, strict=True), marker="o", color=f"C{j}", label=f"ours, {partner}")
        others = [
            (a["record"]["merge_weight"], accuracy_split(a["eval"]["other_owner"])[0])
            for a in group
            if a["eval"].get("other_owner")
        ]
        if others:
            ax_m.plot(*zip(*others, strict=True), marker="s", ls="--", color=f"C{j}", label=f"theirs, {partner}")
    ax_m.set(xlabel="weight of the fingerprinted model", ylabel="fingerprints retained (plain keys)")
    ax_m.set(ylim=(-0.02, 1.02), title="linear merge")
    for ax in (ax_ft, ax_q, ax_m):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"persistence of the fingerprints of run {Path(run).name}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(run, fig_path=None):
    """Print the table; write attacks/summary.md and the figure (default attacks/persistence.png). Returns the table."""
    from oml.core.files import atomic_write_text

    table = format_summary(summary_rows(run))
    atomic_write_text(Path(run) / ATTACKS / SUMMARY, table + "\n")
    plot_persistence(run, fig_path or Path(run) / ATTACKS / FIGURE)
    return table


# ------------------------------------------------------------------------------ several runs: which recipe keeps more


# What a recipe column shows, from the run's hashed settings (names as in fingerprinting_config.json).
RECIPE = {
    "strategy": "fingerprint_generation_strategy",
    "N": "max_num_fingerprints",
    "lr": "learning_rate",
    "λ": "forgetting_regularizer_strength",
    "epochs": "num_train_epochs",
    "augmentation": "use_prompt_augmentation",
    "β": "benign_data_ratio",
    "μ": "distance_regularizer",
    "LoRA r": "lora_rank",
}


def plain_after(attack):
    """Plain-key accuracy after an attack: its evaluation, else the last point of a fine-tuning attack's retention
    curve (recorded during the attack, before any evaluation)."""
    if attack["eval"]:
        return accuracy_split(attack["eval"])[0]
    curve = attack["record"].get("retention") or []
    return curve[-1]["accuracy"] if curve else None


def compare_rows(runs):
    """One row per run: {"run", "recipe": {column: value}, "plain", "attacks": {attack id: plain-key accuracy},
    "kept": {attack id: share of the run's answered keys still answered, or None}}.
    The recipe keeps only the settings that differ between the runs (all of them for a single run)."""
    configs = [recorded_settings((read_json(Path(r) / CONFIG) or {}).get("hashed", {})) for r in runs]
    varying = [c for c, name in RECIPE.items() if len({repr(h.get(name)) for h in configs}) > 1 or len(runs) == 1]
    rows = []
    for run, hashed in zip(runs, configs, strict=True):
        own, attacks = read_json(Path(run) / EVAL_RESULTS), read_attacks(run)
        rows.append(
            {
                "run": Path(run).name,
                "recipe": {c: hashed.get(RECIPE[c]) for c in varying},
                "plain": accuracy_split(own)[0] if own else None,
                "attacks": {a["id"]: plain_after(a) for a in attacks},
                "kept": {a["id"]: kept(own, a["eval"], (a["eval"] or {}).get("num_fingerprints")) for a in attacks},
            }
        )
    return rows


def format_compare(rows):
    recipe = list(rows[0]["recipe"]) if rows else []
    attack_ids = sorted({a for r in rows for a in r["attacks"]})
    lines = [
        "| run | " + " | ".join(recipe + ["plain keys"] + attack_ids) + " |",
        "|---" * (2 + len(recipe) + len(attack_ids)) + "|",
    ]
    for r in rows:
        cells = [r["run"]] + [str(r["recipe"][c]) for c in recipe] + [pct(r["plain"])]
        for a in attack_ids:
            k = r["kept"].get(a)
            cells.append(pct(r["attacks"].get(a)) + ("" if k is None else f" (kept {k:.1%})"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="run", help="a run folder, results/<hash> (several: compare them)")
    parser.add_argument("--fig", default=None, help="where the figure goes (default: <run>/attacks/persistence.png)")
    parser.add_argument("--out", default=None, help="several runs: also write their table here (markdown)")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (Path(run) / ATTACKS).is_dir():
            raise UserError(f"{run} has no {ATTACKS}/ folder: run attack_fingerprints.py first")
    if len(args.runs) == 1:
        print(write_summary(args.runs[0], args.fig))
        return
    from oml.core.files import atomic_write_text

    table = format_compare(compare_rows(args.runs))
    if args.out:
        atomic_write_text(args.out, table + "\n")
    print(table)


if __name__ == "__main__":
    run_cli(main)
