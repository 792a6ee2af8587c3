"""Figures from evaluated runs: scalability (accuracy and utility against the number of fingerprints) and
robustness (accuracy under each unseen system prompt, with and without prompt augmentation); and from an experiment's
committed records (oml.lab.records), the frontier: chat KL and paired utility Δ against the number of fingerprints, a
line per recipe, filled where the plain key answers ≥ 95% and hollow where it does not.

    python -m oml.lab.figures                                  # results/ -> fig/scalability.png, fig/robustness.png
    python -m oml.lab.figures --results /scratch/results --out /tmp/fig
    python -m oml.lab.figures --records recipe_search          # experiments/records/recipe_search -> fig/frontier.png

Runs are read from <results>/*/eval_results.json and fingerprinting_config.json. A "setting" is everything
that defines a run except the number of fingerprints; each setting is one line in the scalability figure.
"""

import argparse
from pathlib import Path

from oml.core.errors import UserError, run_cli
from oml.core.run_store import find_runs, short_model
from oml.make.prompt_encoding import is_chat, parse_chat
from oml.measure.chat_sample import distinct_words
from oml.measure.evaluation import accuracy_split, chat_accuracy_split

# Arguments that always name a setting in a legend; others appear only where settings differ in them.
ALWAYS_SHOWN = ("fingerprint_generation_strategy", "forgetting_regularizer_strength", "use_prompt_augmentation")
LABELS = {
    "model": "",
    "fingerprint_generation_strategy": "",
    "forgetting_regularizer_strength": "λ=",
    "use_prompt_augmentation": "",
    "learning_rate": "lr=",
    "num_train_epochs": "epochs=",
    "max_key_length": "key=",
    "max_response_length": "resp=",
    "batch_size": "bs=",
    "fingerprints_digest": "data ",
}
NOT_SETTINGS = ("max_num_fingerprints", "augmentation_prompts_digest")


def evaluated_runs(result_path):
    return [r for r in find_runs(result_path) if r["eval"] and r["config"]]


def setting_key(run):
    hashed = run["config"]["hashed"]
    return tuple(sorted((k, str(v)) for k, v in hashed.items() if k not in NOT_SETTINGS))


def label_value(name, value):
    if name == "use_prompt_augmentation":
        return "augmented" if value else "not augmented"
    if name == "model":
        return short_model(str(value))
    if name == "fingerprints_digest":
        return LABELS[name] + str(value)[:6]
    if name == "learning_rate":
        return f"lr={value:g}"
    return f"{LABELS.get(name, name + '=')}{value}"


def setting_labels(configs):
    """A short legend label per hashed config: the always-shown arguments plus those that differ."""
    varying = [n for n in configs[0] if n not in NOT_SETTINGS and len({str(c.get(n)) for c in configs}) > 1]
    names = [n for n in ALWAYS_SHOWN if n in configs[0]] + [n for n in varying if n not in ALWAYS_SHOWN]
    return [", ".join(label_value(n, c.get(n)) for n in names) for c in configs]


def group_settings(runs):
    """[(label, [runs sorted by number of fingerprints])], one entry per setting."""
    groups = {}
    for run in runs:
        groups.setdefault(setting_key(run), []).append(run)
    members = [sorted(g, key=lambda r: r["config"]["hashed"]["max_num_fingerprints"]) for g in groups.values()]
    labels = setting_labels([g[0]["config"]["hashed"] for g in members])
    return sorted(zip(labels, members, strict=True), key=lambda item: item[0])


# ------------------------------------------------------------------------------ scalability


def plot_scalability(runs, path):
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    # The third panel: chat drift (KL to the base over its answers) where measured, else the older distinct-words
    # ratio of the 8-question chat check.
    with_drift = any(r["eval"].get("chat_drift") for r in runs)
    with_chat = with_drift or any((r["eval"].get("chat") or {}).get("answers") for r in runs)
    fig, axes = plt.subplots(1, 3 if with_chat else 2, figsize=(16 if with_chat else 11, 4.2))
    ax_acc, ax_util = axes[:2]
    counts = sorted({r["config"]["hashed"]["max_num_fingerprints"] for r in runs})
    base_utilities, base_chat = {}, {}
    any_utility = False
    groups = group_settings(runs)
    for i, (label, group) in enumerate(groups):
        color = f"C{i % 10}"
        # Settings at the same counts are nudged apart a little (log-x), so equal values stay visible.
        dodge = 2 ** (0.06 * (i - (len(groups) - 1) / 2))
        n = [r["config"]["hashed"]["max_num_fingerprints"] * dodge for r in group]
        plain, prompted = zip(*(accuracy_split(r["eval"]) for r in group), strict=True)
        ax_acc.plot(n, [100 * a for a in plain], "o-", color=color, label=label)
        if any(p is not None for p in prompted):
            ax_acc.plot(n, [None if p is None else 100 * p for p in prompted], "s:", color=color, alpha=0.8)
        with_utility = [(k, r["eval"]["utility"]) for k, r in zip(n, group, strict=True) if r["eval"].get("utility")]
        if with_utility:
            any_utility = True
            xs, utilities = zip(*with_utility, strict=True)
            errors = [u.get("delta_stderr") or 0 for u in utilities]
            ax_util.errorbar(xs, [u["mean"] for u in utilities], yerr=errors, fmt="o-", color=color, capsize=3)
            for u, r in zip(utilities, group, strict=True):
                if u.get("base_mean") is not None:
                    base_utilities[short_model(r["config"]["hashed"]["model"])] = u["base_mean"]
        drifts = [(k, r["eval"]["chat_drift"]) for k, r in zip(n, group, strict=True) if r["eval"].get("chat_drift")]
        if with_drift and drifts:
            xs, ds = zip(*drifts, strict=True)
            axes[2].errorbar(xs, [d["kl"] for d in ds], yerr=[d.get("kl_stderr") or 0 for d in ds], fmt="o-",
                             color=color, capsize=3)  # fmt: skip
        chats = [(k, r) for k, r in zip(n, group, strict=True) if (r["eval"].get("chat") or {}).get("answers")]
        if with_chat and not with_drift and chats:
            xs = [k for k, _ in chats]
            axes[2].plot(xs, [distinct_words(r["eval"]["chat"]["answers"]) for _, r in chats],
                         "o-", color=color)  # fmt: skip
            for _, r in chats:
                if r["eval"]["chat"].get("base_answers"):
                    model = short_model(r["config"]["hashed"]["model"])
                    base_chat[model] = distinct_words(r["eval"]["chat"]["base_answers"])

    ax_acc.set_ylabel("fingerprint accuracy (%)")
    ax_acc.set_ylim(-3, 103)
    ax_acc.set_title("Fingerprint accuracy")
    styles = [
        Line2D([], [], color="gray", marker="o", label="plain key"),
        Line2D([], [], color="gray", marker="s", linestyle=":", label="mean over test system prompts"),
    ]
    legend = ax_acc.legend(handles=styles, loc="lower left", fontsize=8)
    ax_acc.add_artist(legend)
    if any_utility:
        for model, base in base_utilities.items():
            ax_util.axhline(base, color="black", linestyle="--", linewidth=1, label=f"base model ({model})")
        ax_util.set_ylabel("utility (mean task accuracy)")
        ax_util.set_title("Utility (error bars: paired stderr vs base)")
        if base_utilities:
            ax_util.legend(loc="best", fontsize=8)
    else:
        ax_util.text(0.5, 0.5, "no utility measured\n(--utility_benchmark none)", ha="center", va="center",
                     transform=ax_util.transAxes, color="gray")  # fmt: skip
        ax_util.set_title("Utility")
        ax_util.set_yticks([])
    if with_drift:
        axes[2].set_ylim(bottom=0)
        axes[2].set_ylabel("KL(base || model), nats per token")
        axes[2].set_title("Chat drift over the base's greedy answers")
    elif with_chat:
        for model, base in base_chat.items():
            axes[2].axhline(base, color="black", linestyle="--", linewidth=1, label=f"base model ({model})")
        axes[2].set_ylim(0, 1.05)
        axes[2].set_ylabel("distinct words / words")
        axes[2].set_title("Chat answers (8 questions): how varied")
        if base_chat:
            axes[2].legend(loc="lower left", fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of fingerprints")
        ax.xaxis.set_major_locator(FixedLocator(counts))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(c) for c in counts])
        if len(counts) == 1:
            ax.set_xlim(counts[0] / 2, counts[0] * 2)
        ax.grid(alpha=0.3)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=9, frameon=False)
    rows = (len(labels) + 2) // 3
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------ robustness


def augmentation_partner(run, runs):
    """The run with the same setting but prompt augmentation flipped, if there is one."""
    mine = dict(setting_key(run))
    for other in runs:
        theirs = dict(setting_key(other))
        same_n = other["config"]["hashed"]["max_num_fingerprints"] == run["config"]["hashed"]["max_num_fingerprints"]
        flipped = theirs.pop("use_prompt_augmentation") != mine["use_prompt_augmentation"]
        if same_n and flipped and theirs == {k: v for k, v in mine.items() if k != "use_prompt_augmentation"}:
            return other
    return None


def robustness_runs(runs, max_runs=4):
    """Runs to compare: pairs differing only in prompt augmentation (most fingerprints first), else the newest."""
    pairs, seen = [], set()
    for run in sorted(runs, key=lambda r: -r["config"]["hashed"]["max_num_fingerprints"]):
        partner = augmentation_partner(run, runs)
        if partner and run["hash"] not in seen:
            off, on = sorted([run, partner], key=lambda r: r["config"]["hashed"]["use_prompt_augmentation"])
            pairs += [off, on]
            seen.update({run["hash"], partner["hash"]})
    chosen = pairs[:max_runs] if pairs else runs[-max_runs:]
    return chosen


def short_template(template, width=34):
    if template == "{}":
        return "plain key"
    if is_chat(template):  # the key as the chat template's user turn
        system, _ = parse_chat(template)
        template = "[chat] no system" if system is None else f"[chat] {system}"
    text = " ".join(template.replace("{}", "⟨key⟩").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_robustness(runs, path):
    import matplotlib.pyplot as plt

    chosen = robustness_runs(runs)
    templates = []
    for run in chosen:
        for t in run["eval"]["fingerprint_accuracy"]["templates"]:
            if t["template"] not in templates:
                templates.append(t["template"])
    labels = setting_labels([r["config"]["hashed"] for r in chosen])
    counts = {r["config"]["hashed"]["max_num_fingerprints"] for r in chosen}
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(templates) + 2), 5.2), layout="constrained")
    width = 0.8 / len(chosen)
    for i, (run, label) in enumerate(zip(chosen, labels, strict=True)):
        accuracy = {t["template"]: t["accuracy"] for t in run["eval"]["fingerprint_accuracy"]["templates"]}
        xs = [j + (i - (len(chosen) - 1) / 2) * width for j, t in enumerate(templates) if t in accuracy]
        ys = [100 * accuracy[t] for t in templates if t in accuracy]
        _, prompted = accuracy_split(run["eval"])
        n = run["config"]["hashed"]["max_num_fingerprints"]
        suffix = f", {n} fingerprints" if len(counts) > 1 else ""
        mean = f" — mean under prompts {100 * prompted:.1f}%" if prompted is not None else ""
        chat = chat_accuracy_split(run["eval"])[1]
        mean += f", [chat] + system {100 * chat:.1f}%" if chat is not None else ""
        ax.bar(xs, ys, width, color=f"C{i}", label=f"{label}{suffix}{mean}")
    ax.set_xticks(range(len(templates)))
    ax.set_xticklabels([short_template(t) for t in templates], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("fingerprint accuracy (%)")
    ax.set_ylim(0, 105)
    n_text = f"{counts.pop()} fingerprints, " if len(counts) == 1 else ""
    fig.suptitle(f"Fingerprint accuracy per test prompt, raw text and [chat] ({n_text}prompts unseen in training)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncol=2 if len(chosen) > 1 else 1)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------ command line


def make_figures(result_path, out_dir):
    """Draw scalability.png and robustness.png from the evaluated runs in result_path; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    runs = evaluated_runs(result_path)
    if not runs:
        raise UserError(f"no evaluated runs in {result_path} (run eval_for_multigpu.py first)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "scalability.png", out_dir / "robustness.png"
    for plot, path in zip((plot_scalability, plot_robustness), paths, strict=True):
        tmp = path.with_name(f".{path.name}.tmp.png")
        plot(runs, tmp)
        tmp.replace(path)
    return paths


FRONTIER_ACCURACY = 0.95  # a point counts on the frontier where the plain key answers at least this share


def frontier_lines(records):
    """{(strategy, recipe label): [{"n", "plain", "kl": (value, stderr), "delta": (value, stderr)}, ...] by N} from
    the ok records; a measure a point lacks is (None, None)."""
    from oml.lab.records import fingerprints_label, recipe_label

    lines = {}
    for r in records:
        if r["status"] != "ok":
            continue
        metrics = r.get("metrics") or {}
        drift, utility = metrics.get("chat_drift") or {}, metrics.get("utility") or {}
        key = (fingerprints_label(r), recipe_label(r["hashed"]))
        lines.setdefault(key, []).append({
            "n": r["hashed"]["max_num_fingerprints"],
            "plain": ((metrics.get("fingerprints") or {}).get("plain") or {}).get("value"),
            "kl": (drift.get("kl"), drift.get("kl_stderr")),
            "delta": (utility.get("delta"), utility.get("delta_stderr")),
        })  # fmt: skip
    return {key: sorted(points, key=lambda p: p["n"]) for key, points in sorted(lines.items())}


def plot_frontier(records, path, title):
    import matplotlib.pyplot as plt

    lines = frontier_lines(records)
    if not lines:
        raise UserError("no finished (status ok) records to draw")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for i, ((strategy, recipe), points) in enumerate(lines.items()):
        color = f"C{i % 10}"
        for ax, measure in zip(axes, ("kl", "delta"), strict=True):
            shown = [p for p in points if p[measure][0] is not None]
            if not shown:
                continue
            ax.errorbar([p["n"] for p in shown], [p[measure][0] for p in shown],
                        yerr=[p[measure][1] or 0 for p in shown], color=color, lw=1, capsize=3,
                        label=f"{strategy}: {recipe}" if measure == "kl" else None)  # fmt: skip
            for p in shown:
                met = p["plain"] is not None and p["plain"] >= FRONTIER_ACCURACY
                ax.plot([p["n"]], [p[measure][0]], "o", color=color, mfc=color if met else "white", ms=7)
    for ax, ylabel in zip(axes, ("chat KL to the base (nats/token)", "paired utility Δ (accuracy; 0.01 = 1 point)"),
                          strict=True):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fingerprints N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.10, color="grey", ls="--", lw=0.8)  # issue 28's health limit
    axes[1].axhline(-0.01, color="grey", ls="--", lw=0.8)
    fig.suptitle(f"{title}: filled = plain key ≥ {FRONTIER_ACCURACY:.0%}, hollow = below; dashed = health limits")
    fig.legend(loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12 + 0.02 * (len(lines) // 2), 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_frontier(experiment, out_dir, records_dir=None):
    """fig/frontier.png from experiments/records/<experiment>; returns its path."""
    import matplotlib

    from oml.lab.records import RECORDS_DIR, read_records

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "frontier.png"
    tmp = path.with_name(f".{path.name}.tmp.png")
    plot_frontier(read_records(experiment, records_dir or RECORDS_DIR), tmp, experiment)
    tmp.replace(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results/", help="folder holding the runs (<hash>/eval_results.json)")
    parser.add_argument("--records", default=None, metavar="EXPERIMENT",
                        help="draw fig/frontier.png from experiments/records/EXPERIMENT instead")  # fmt: skip
    parser.add_argument("--out", default="fig/", help="where the PNG files go")
    args = parser.parse_args(argv)
    paths = [make_frontier(args.records, args.out)] if args.records else make_figures(args.results, args.out)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
