"""report.md and report.html: the run's metadata, the recommendation, the warnings and the figures.

report.md links the PNGs beside it; report.html is one self-contained file (inline style, every
image a base64 ``data:`` URI, no external ``src``), so it can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import html
import json

from kvq import __version__
from kvq.evaluation.quant_cache import describe_spec
from kvq.model.model_spec import layers_text
from kvq.reporting.findings import Assessment
from kvq.reporting.inputs import ReportInputs
from kvq.solving.loss import recorded_choices

STATS_KEYS = ("model", "config_hash", "dataset", "dataset_origin", "samples", "seqlen", "seed", "tokens", "dtype",
              "kvq_version")


def shape_text(inputs: ReportInputs) -> str:
    """The model's KV cache in one line: layers x KV heads x head_dim, or per layer where they differ, and which
    layers hold a KV cache where not all do."""
    text = inputs.shape.text()
    if len(inputs.layers) < inputs.num_layers:
        text += (f"; KV cache in {len(inputs.layers)} of {inputs.num_layers} layers ({layers_text(inputs.layers)}), "
                 "the others keep a recurrent state or read another layer's cache")
    return text


def metadata_rows(inputs: ReportInputs) -> list[tuple[str, str]]:
    """(name, value) rows: the calibration metadata, the model shape, the recipe, the reports read."""
    meta = inputs.stats.metadata
    rows = [(key, meta[key]) for key in STATS_KEYS if meta.get(key)]
    rows.append(("shape", shape_text(inputs)))
    rows.append(("histograms", inputs.stats.histograms or "none (calibrate with --histograms head for the subnormal "
                 "share)"))
    if inputs.scales is not None:
        r = inputs.scales.recipe
        text = f"{r.name}: K {describe_spec(r.key)} ({r.key.observer}), V {describe_spec(r.value)} ({r.value.observer})"
        if r.transforms:
            text += ", transforms " + ", ".join(t.name for t in r.transforms)
        rows.append(("recipe", text))
        record = recorded_choices(inputs.scales.metadata)
        if record is not None:
            rows.append(("loss observer", loss_choices_text(record)))
    else:
        rows.append(("recipe", "no scales.safetensors in the folder"))
    if inputs.validation is not None:
        data = inputs.validation.get("data", {})
        rows.append(("validation", f"{inputs.validation_path}: {data.get('dataset', '?')}, {data.get('samples', '?')} "
                     f"samples, {data.get('tokens', '?')} tokens, recipe {inputs.validation['recipe'].get('name', '?')}"))
    if inputs.evaluation is not None:
        data = inputs.evaluation.get("data", {})
        rows.append(("eval", f"{inputs.evaluation_path}: {data.get('dataset', '?')}, {data.get('windows', '?')} windows "
                     f"x {data.get('seqlen', '?')} tokens"))
        generation = generation_text(inputs.evaluation)
        if generation:
            rows.append(("generation", generation))
    rows.append(("report by", f"kvq {__version__}"))
    return rows


def loss_choices_text(record: dict) -> str:
    """The loss observer's choice per layer (K / V), from its record in the scales' metadata."""
    layers = record.get("layers", {})
    picks = ", ".join(f"{i} {layer.get('k', '-')}/{layer.get('v', '-')}" for i, layer in
                      sorted(layers.items(), key=lambda item: int(item[0])))
    start = f", from {record['start']} everywhere" if isinstance(record.get("start"), str) else ""
    return (f"chosen by the model's loss on {record.get('windows', '?')} calibration windows{start}, per layer K/V: "
            f"{picks}")


def generation_text(evaluation: dict) -> str | None:
    """Each eval row's generation agreement (``kvq eval --generate``), or None when it was not measured."""
    gen = evaluation.get("generation")
    if not isinstance(gen, dict):
        return None
    parts = []
    for row in evaluation.get("rows", []):
        g = row.get("generation")
        if isinstance(g, dict):
            err = g.get("first_difference_stderr")
            parts.append(f"{row.get('name', '?')} {100 * g['agreement']:.1f}% (first difference after "
                         f"{g['first_difference_mean']:.1f}{'' if err is None else f' ± {err:.1f}'})")
    return (f"{gen.get('tokens', '?')} greedy tokens from {gen.get('prompts', '?')} prompts, tokens equal to the "
            "model's: " + "; ".join(parts))


def source_warnings(inputs: ReportInputs) -> list[str]:
    """The warnings the validate / eval reports carry themselves, and a model mismatch between the files."""
    out = []
    ours = inputs.stats.metadata.get("config_hash")
    for name, report in (("validate.json", inputs.validation), ("eval.json", inputs.evaluation)):
        if report is None:
            continue
        out += [f"{name}: {w}" for w in report.get("warnings", []) if isinstance(w, str)]
        theirs = report["model"].get("config_hash")
        if ours and theirs and ours != theirs:
            out.append(f"{name} was measured on a model with config hash {theirs}; the statistics' is {ours}")
    return out


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(inputs: ReportInputs, assessment: Assessment, figures: list[dict], notes: list[str]) -> str:
    lines = [f"# kvq report: {inputs.stats.metadata.get('model', inputs.out_dir.name)}", "",
             "| | |", "|---|---|"]
    lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in metadata_rows(inputs)]
    lines += ["", "## Recommended recipe", "", f"**{assessment.recipe}**", ""]
    lines += [f"- {reason}" for reason in assessment.reasons]
    lines += ["", "## Warnings", ""]
    found = [f"- **{f.kind}** ({f.figure}): {f.text}" for f in assessment.findings]
    lines += found or ["- none: no outlier channels, even heads, no fp8 saturation or subnormal layers, no scale at "
                       "the floor, no dominant layer (docs/report.md gives the thresholds)."]
    lines += [f"- **note**: {n}" for n in notes]
    lines += ["", "## Figures", ""]
    for fig in figures:
        lines += [f"### {fig['title']}", "", f"![{fig['title']}]({fig['file']})", "", fig["caption"], ""]
    return "\n".join(lines).rstrip() + "\n"


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1060px;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse}td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}"
          "td:first-child{font-weight:600}img{max-width:100%;border:1px solid #eee}"
          "li{margin:.4em 0}.kind{font-family:monospace;background:#fff3cd;padding:0 4px}")


def page(inputs: ReportInputs, assessment: Assessment, figures: list[dict], notes: list[str],
         images: dict[str, bytes]) -> str:
    """report.html: the same content as report.md, every image embedded."""
    e = html.escape
    title = f"kvq report: {inputs.stats.metadata.get('model', inputs.out_dir.name)}"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{e(title)}</h1><table>"]
    parts += [f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in metadata_rows(inputs)]
    parts.append(f"</table><h2>Recommended recipe</h2><p><strong>{e(assessment.recipe)}</strong></p><ul>")
    parts += [f"<li>{e(r)}</li>" for r in assessment.reasons]
    parts.append("</ul><h2>Warnings</h2><ul>")
    parts += [f"<li><span class=\"kind\">{e(f.kind)}</span> ({e(f.figure)}): {e(f.text)}</li>"
              for f in assessment.findings]
    if not assessment.findings:
        parts.append("<li>none (docs/report.md gives the thresholds)</li>")
    parts += [f"<li><span class=\"kind\">note</span> {e(n)}</li>" for n in notes]
    parts.append("</ul><h2>Figures</h2>")
    for fig in figures:
        data = base64.b64encode(images[fig["file"]]).decode("ascii")
        parts.append(f"<h3>{e(fig['title'])}</h3><img alt=\"{e(fig['title'])}\" src=\"data:image/png;base64,{data}\">"
                     f"<p>{e(fig['caption'])}</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def figures_json(figures: list[dict], assessment: Assessment) -> bytes:
    """figures.json: every figure's axes, ticks and data, and the findings, for scripts and tests."""
    findings = [{"kind": f.kind, "tensor": f.tensor, "figure": f.figure, "layers": list(f.layers), "text": f.text}
                for f in assessment.findings]
    doc = {"kvq_version": __version__, "report": "report", "figures": figures, "findings": findings,
           "recipe": assessment.recipe, "reasons": assessment.reasons}
    return (json.dumps(doc, indent=1) + "\n").encode("utf-8")
