"""Stage 2, the fit and its report: per-layer temperature schedules fitted per draft head, their
calibration on held-out positions (ECE, the reliability diagram), the next-token head's
agreement, and the plot of the tuning's Pareto front."""

from __future__ import annotations

from pathlib import Path

from specbound_runtime.policy import paper_temperatures

from . import collect as C
from .fit import confidence_at, fit_paper_alpha, fit_temperature, metrics
from .precision import round_bits
from .space import Schedules


def fit_schedules(records: C.Records, num_layers: int) -> tuple[Schedules, dict]:
    """Per-layer temperatures and the paper's alpha, per head, on the fitting split; metrics on the
    held-out split: raw confidence (T = 1), the paper's schedule, and the fitted temperatures."""
    fit = records.select(~records.held_out)
    held = records.select(records.held_out)
    layers = records.layers
    fitted, alpha, report = {}, {}, {}
    for h, head in enumerate(C.HEADS):
        # fitted values keep STAT_BITS significant bits before anything uses them (calibrate.precision)
        temps = tuple(round_bits(fit_temperature(fit.conf[:, h, c], fit.right[:, h, c])) for c in range(len(layers)))
        a = round_bits(
            fit_paper_alpha([fit.conf[:, h, c] for c in range(len(layers))], [fit.right[:, h, c] for c in range(len(layers))], layers, num_layers)
        )
        fitted[head], alpha[head] = temps, a
        paper_t = paper_temperatures(a, layers, num_layers)
        rows = []
        n = len(fit.seq)
        for c, layer in enumerate(layers):
            y = held.right[:, h, c]
            # how many positions are enough: the same fit on the first quarter and half
            stability = {
                str(m): round(fit_temperature(fit.conf[:m, h, c], fit.right[:m, h, c]), 4) for m in (n // 4, n // 2) if m
            }
            stability[str(n)] = round(temps[c], 4)
            rows.append(
                {
                    "layer": layer,
                    "temperature": round(temps[c], 6),
                    "temperature_by_positions": stability,
                    "paper_temperature": round(float(paper_t[c]), 6),
                    "raw": metrics(confidence_at(held.conf[:, h, c], 1.0), y).to_dict(),
                    "paper": metrics(confidence_at(held.conf[:, h, c], float(paper_t[c])), y).to_dict(),
                    "fitted": metrics(confidence_at(held.conf[:, h, c], temps[c]), y).to_dict(),
                }
            )
        report[head] = {"alpha": round(a, 6), "layers": rows}
    return Schedules(layers=layers, num_layers=num_layers, fitted=fitted, alpha=alpha), report

def reliability_png(records: C.Records, schedules: Schedules, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    held = records.select(records.held_out)
    fig, axes = plt.subplots(1, len(C.HEADS), figsize=(6 * len(C.HEADS), 5), squeeze=False)
    for h, head in enumerate(C.HEADS):
        ax = axes[0][h]
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for c, layer in enumerate(records.layers):
            if c % max(1, len(records.layers) // 4) and c != len(records.layers) - 1:
                continue
            y = held.right[:, h, c]
            if not len(y):
                continue
            p_paper = confidence_at(held.conf[:, h, c], schedules.temperatures(head, "paper-fitted")[c])
            p_fit = confidence_at(held.conf[:, h, c], schedules.fitted[head][c])
            # calibration_curve returns (observed agreement, mean confidence) of the non-empty bins
            agree, conf = calibration_curve(y, p_fit, n_bins=10, pos_label=True)
            line = ax.plot(conf, agree, "o-", label=f"layer {layer} fitted")[0]
            agree, conf = calibration_curve(y, p_paper, n_bins=10, pos_label=True)
            ax.plot(conf, agree, "x--", color=line.get_color(), alpha=0.6, label=f"layer {layer} paper")
        ax.set_title(f"held-out reliability, {head} head")
        ax.set_xlabel("confidence")
        ax.set_ylabel("agreement with the last layer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)

def pareto_png(pareto: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["waste"] for p in pareto], [p["speedup"] for p in pareto], "o-")
    ax.set_xlabel("rejected drafts per emitted token")
    ax.set_ylabel("simulated speedup")
    ax.set_title("Pareto front: speed vs waste")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)

def next_head_report(records: C.Records, used: bool) -> dict:
    """How often the fitted next-token head's draft is right on the held-out positions (top-1
    agreement with the full model's argmax; under sampling also its mean acceptance probability),
    and whether the tuned policy drafts with it."""
    held = records.select(records.held_out)
    out: dict = {"used": bool(used)}
    if held.head_right is not None and len(held.seq):
        out["held_out_agreement"] = round(float(held.head_right.mean()), 4)
        out["held_out_positions"] = int(len(held.seq))
        if held.head_accept is not None:
            out["held_out_acceptance"] = round(float(held.head_accept.mean()), 4)
    return out
