"""The report `sparsify_` returns: per-layer rows, calibration setup, per-pass timings."""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Report:
    rows: list[dict]  # module, param, technique, config, shape, sparsity, error (+ error_kind), seconds
    setup: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    scopes: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all transformed weights (module rewrites such as CATS not counted)."""
        rows = [r for r in self.rows if r.get("shape")]
        total = sum(r["shape"][0] * r["shape"][1] for r in rows)
        return sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in rows) / total if total else 0.0

    def to_dict(self) -> dict:
        return {"rows": self.rows, "setup": self.setup, "timings": self.timings, "scopes": self.scopes,
                "overall_sparsity": self.sparsity}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kw)

    def table(self) -> str:
        width = max([len(r["module"]) for r in self.rows] + [6])
        head = f"{'module':<{width}}  {'technique':<24} {'shape':>11}  {'sparsity':>8}  {'rel. error':>10}  {'time':>8}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            pattern = " ".join(filter(None, (r["config"].get("pattern") or r.get("label", ""), r.get("quant"))))
            shape = "x".join(map(str, r["shape"])) if r.get("shape") else "-"
            lines.append(f"{r['module']:<{width}}  {(r['technique'].removesuffix('Config') + ' ' + pattern).strip():<24} "
                         f"{shape:>11}  {r['sparsity']:>8.1%}  {_error(r):>10}  {r['seconds']:>7.3f}s")
        lines.append(f"{'total':<{width}}  {'':<24} {'':>11}  {self.sparsity:>8.1%}  {'':>10}  "
                     f"{sum(r['seconds'] for r in self.rows):>7.3f}s")
        if any("threshold" in r for r in self.rows):
            lines.append("CATS rows: the share of MLP neurons zeroed on average (calibration tokens), threshold t")
        if any("context" in r for r in self.rows):
            lines.append("attention rows: the share of causal (query, key) pairs skipped at the model's context "
                         "length (w window, d dilation, s sinks/global tokens)")
        if any(r.get("error_kind") == "diagonal" for r in self.rows):
            lines.append("rel. error = ||(W - W')X||^2 / ||WX||^2 on the calibration inputs; ~ marks an estimate "
                         "from diag(X^T X) (no Hessian collected)")
        elif any(r.get("error") is not None for r in self.rows):
            lines.append("rel. error = ||(W - W')X||^2 / ||WX||^2 on the calibration inputs")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _error(row: dict) -> str:
    if row.get("error") is None:
        return "-"
    return ("~" if row.get("error_kind") == "diagonal" else "") + f"{row['error']:.4f}"
