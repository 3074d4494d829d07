"""What evaluate.py and the training runs report: the JSON schema and the recorded-best line."""
from models.utils import count_parameters, quant_summary

from .checkpoint import OF_THIS_RUN


def report_dict(model, mcfg, results, **extra):
    """The JSON schema shared by evaluate.py --json and final.json."""
    summary = quant_summary(model)
    out = {"accuracy": {m: round(r["accuracy"], 4) for m, r in results.items()},
           "loss": {m: round(r["loss"], 6) for m, r in results.items()},
           "num_examples": next(iter(results.values()))["num_examples"],
           "model": mcfg["model"], "quantization": mcfg["quantization"],
           "parameters": count_parameters(model)}
    if summary:
        out.update({k: summary[k] for k in ("ring_size", "ring_type", "ring_layout", "bits",
                                            "nominal_bits", "num_distinct_values",
                                            "effective_bits", "distinct_values")
                    if k in summary})
    out.update(extra)
    return out


def describe_recorded(meta):
    """One line on the best figure a file records and whose it is (None when it records none).

    meta: :func:`ringq.checkpoint.load_model_from_checkpoint`'s. E.g. ``best val
    accuracy 86.34 (hard) at epoch 23 of the source checkpoint best.pt, not this
    file's``, or ``... at epoch 57 of this run; this file holds epoch 60``.
    """
    best = meta.get("recorded_best")
    if best is None:
        return None
    text = "best " + (f"{best['split']} " if best["split"] else "") \
        + f"accuracy {best['accuracy']:.2f}" + (f" ({best['mode']})" if best["mode"] else "") \
        + (f" at epoch {best['epoch']}" if best["epoch"] is not None else "")
    if best["of"] != OF_THIS_RUN:
        name = meta.get("source_file")
        return text + f" of the source checkpoint{f' {name}' if name else ''}, not this file's"
    epoch = meta.get("epoch")
    if epoch is None or epoch == best["epoch"]:
        return text + " of this run" + (" (this file's epoch)" if epoch is not None else "")
    return text + f" of this run; this file holds epoch {epoch}"
