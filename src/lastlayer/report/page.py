"""The run report: one self-contained HTML file a person opens after a run.

:func:`write` turns a run summary (:meth:`RunSummary.to_dict`, or a summary file read by
:func:`read_summary`) into ``<output_graph stem>.report.html``: data set counts, skipped files,
learning curves, the test confusion matrix as a heat map, per-class scores, the misclassified test
images as thumbnails, settings, timings and cache statistics. Charts are matplotlib SVGs and
thumbnails JPEGs, both inlined as ``data:`` URIs, and the page's Content-Security-Policy forbids
every other source, so it shows the same offline, from a mail attachment or from HDFS. Labels and
paths are user data: the template escapes everything (Jinja2 autoescape).

Needs the ``report`` extra (matplotlib, Jinja2); :func:`missing_libraries` says when it is absent.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from lastlayer import fetch, storage
from lastlayer.dataset import SPLITS
from lastlayer.errors import DataError, LastlayerError
from lastlayer.preprocess import Preprocessing, open_image
from lastlayer.report import input as report_input
from lastlayer.trust import view as trust_view
from lastlayer.trust.memo import Memo, code_digest
from lastlayer.trust.memo import key as memo_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The logger name its lines always had (``lastlayer.report``), whatever the module's name.
log = logging.getLogger("lastlayer.report")

#: What the report needs beyond lastlayer's own dependencies (the ``report`` extra).
LIBRARIES = ("matplotlib", "jinja2")
#: The most misclassified test images shown, and the longest side of a thumbnail, px.
MAX_THUMBNAILS = 48
THUMBNAIL_PX = 160
#: Bounds on one image read for a thumbnail, and on a summary file read by ``lastlayer report``.
IMAGE_LIMITS = fetch.Limits(32 << 20, 60.0, "lastlayer.report.IMAGE_LIMITS", "lastlayer.report.IMAGE_LIMITS")
SUMMARY_LIMITS = fetch.Limits(
    64 << 20, 120.0, "lastlayer.report.SUMMARY_LIMITS", "lastlayer.report.SUMMARY_LIMITS"
)
#: The most skipped files listed (the summary file lists them all).
MAX_SKIPPED_ROWS = 500
#: Charts with more classes than this are left out (the tables still list every class).
MAX_CHART_CLASSES = 60
#: Confusion-matrix cells are annotated with their counts up to this many classes.
MAX_ANNOTATED_CLASSES = 25
#: The most rows of a table of classes, settings or outputs (the summary file lists them all).
MAX_TABLE_ROWS = 500
_READERS = 8
#: The kind of the report's entries in the memo, and what one must be (a base64 SVG ``data:`` URI).
CHART_KIND = "chart"
_SVG_URI = re.compile(rb"data:image/svg\+xml;base64,[A-Za-z0-9+/]*={0,2}")
_THUMBNAIL_PREP = Preprocessing(THUMBNAIL_PX, 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def missing_libraries() -> str | None:
    """Why no report can be built here (a library of the ``report`` extra is missing), or ``None``."""
    missing = [name for name in LIBRARIES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed: pip install 'lastlayer[report]'"


def read_summary(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A run summary file (``<output_graph stem>.summary.json``) as checked JSON data (see
    :func:`lastlayer.report_input.parse`).

    Raises:
        DataError: the file is too big, not JSON, or not a full run's summary as lastlayer writes it.
        StorageError: it cannot be read.
    """
    data = fetch.fetch(url, SUMMARY_LIMITS, storage_options=storage_options, what="the run summary")
    return report_input.parse(data, url)


def write(
    summary: Mapping[str, Any],
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    fetch_images: bool = False,
    memo: Memo | None = None,
) -> None:
    """Build the report of ``summary`` and write it to ``url`` atomically; an existing file there
    must be a lastlayer report. Its charts are read from ``memo`` when it holds them (same data, same
    code), else drawn and kept there.

    Images of the misclassified thumbnails are read from below ``summary["image_dir"]`` with
    ``storage_options``, when it is local or on ``url``'s filesystem (anywhere with ``fetch_images``);
    one that cannot be read is shown as a note, never as a broken image.

    Raises:
        DataError: ``url`` is a file that is not a report, or ``summary`` is malformed.
    """
    report_input.check_replaceable(url, storage_options)
    html = build(summary, storage_options, report_url=url, fetch_images=fetch_images, memo=memo)
    storage.write_atomic(url, html.encode(), storage_options)


def build(
    summary: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
    *,
    report_url: str = "",
    fetch_images: bool = False,
    memo: Memo | None = None,
) -> str:
    """The report's HTML text (thumbnails read as :func:`write` says, for a report at ``report_url``;
    charts from ``memo`` as it says).

    Raises:
        DataError: ``summary`` is not shaped as a run summary.
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lastlayer", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    try:
        clean = report_input.checked(summary, "the run summary")
        page = _page(clean, storage_options, report_url, fetch_images, Charts(memo))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise DataError(
            f"the run summary is not as lastlayer writes it ({exc.__class__.__name__}: {exc}): pass the "
            ".summary.json file of a run, unedited"
        ) from None
    return env.get_template("report.html").render(page=page)


# -- the page's content --------------------------------------------------------------------------
def _page(
    summary: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None,
    report_url: str,
    fetch_images: bool,
    chart: Charts,
) -> dict[str, Any]:
    labels: list[str] = list(summary["labels"])
    metrics = summary["metrics"]
    matrix = summary["confusion_matrix"]["matrix"]
    curve = summary.get("learning_curve") or {}
    wrong = list(summary.get("misclassified") or [])
    return {
        "title": f"lastlayer run: {summary.get('architecture', '?')} on {summary.get('image_dir', '?')}",
        "headline": _headline(summary),
        "dataset": {
            "rows": _count_rows(labels, summary["image_counts"]),
            "chart": chart(_dataset, labels, summary["image_counts"]),
        },
        "skipped": {
            "rows": summary.get("skipped", [])[:MAX_SKIPPED_ROWS],
            "total": len(summary.get("skipped", [])),
        },
        "curve": chart(_curves, curve) if curve.get("step") else None,
        "confusion": chart(_confusion, labels, matrix) if sum(map(sum, matrix)) else None,
        "per_class": _capped(_class_rows(summary["per_class"])),
        "multi_label": _multi_label(summary.get("multi_label"), chart),
        "misclassified": {
            "shown": _thumbnails(
                summary.get("image_dir", ""),
                wrong[:MAX_THUMBNAILS],
                storage_options,
                report_url,
                fetch_images,
            ),
            "total": sum(v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j),
            "test_n": sum(map(sum, matrix)),
        },
        "settings": _capped(sorted((str(k), _shown(v)) for k, v in (summary.get("options") or {}).items())),
        "timings": _capped([(k, f"{v:.3f}") for k, v in (summary.get("timings") or {}).items()]),
        "cache": _capped([(k, str(v)) for k, v in (summary.get("cache") or {}).items()]),
        "outputs": _capped([(k, str(v)) for k, v in summary["outputs"].items() if v]),
        "run": [
            (k, _shown(summary.get(k)))
            for k in ("lastlayer_version", "architecture", "architecture_requested", "model_key", "seed")
        ],
        "accuracies": [(k, _share(v) if "accuracy" in k else _shown(v)) for k, v in metrics.items()],
        "trust": trust_view.page(
            summary.get("trust"),
            chart,
            lambda items: _thumbnails(
                summary.get("image_dir", ""), items, storage_options, report_url, fetch_images
            ),
        ),
    }


def _capped(rows: list[Any]) -> list[Any]:
    """The first :data:`MAX_TABLE_ROWS` rows, and one saying how many more the summary file holds."""
    if len(rows) <= MAX_TABLE_ROWS:
        return rows
    more = f"… {len(rows) - MAX_TABLE_ROWS:,} more rows: see the summary file"
    width = len(rows[0]) if isinstance(rows[0], (list, tuple)) else 1
    return [*rows[:MAX_TABLE_ROWS], (more, *([""] * (width - 1)))]


def _headline(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    metrics, images = summary["metrics"], summary["images"]
    total = (summary.get("timings") or {}).get("total_s")
    return [
        ("Test accuracy", f"{_share(metrics.get('test_accuracy'))} (N={metrics.get('test_n', 0)})"),
        (
            "Validation + test",
            f"{_share(metrics.get('validation_and_test_accuracy'))} "
            f"(N={metrics.get('validation_and_test_n', 0)})",
        ),
        ("Classes", str(len(summary["labels"]))),
        ("Images used", f"{images.get('used', 0)} of {images.get('found', 0)}"),
        ("Skipped", str(images.get("skipped", 0))),
        ("Run time", "—" if total is None else f"{total:.1f} s"),
    ]


def _multi_label(multi: Mapping[str, Any] | None, chart: Charts) -> dict[str, Any] | None:
    """A ``--multi_label`` run's scores: its headline, one row per label and their bars (in place of
    the confusion matrix and the per-class table, which compare single labels)."""
    if not multi:
        return None
    per_label = multi["per_label"]
    shares = ("precision", "recall", "f1", "average_precision")
    rows = [
        (label, *(_share(s.get(k)) for k in shares), str(s.get("support", 0)), f"{s.get('threshold', 0):.3f}")
        for label, s in per_label.items()
    ]
    names = ("mean average precision", "micro-F1", "macro-F1", "exact match")
    keys = ("mean_average_precision", "micro_f1", "macro_f1", "exact_match")
    return {
        "headline": [(n, _share(multi.get(k))) for n, k in zip(names, keys, strict=True)],
        "rows": _capped(rows),
        "chart": chart(_per_label, per_label),
    }


def _share(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None or value == "" else str(value)


def _count_rows(labels: Sequence[str], counts: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    rows = [[label, *(counts[label].get(s, 0) for s in SPLITS)] for label in labels]
    totals = ["total", *(sum(r[i] for r in rows) for i in range(1, len(SPLITS) + 1))]
    shown = [[str(c) for c in [*r, sum(r[1:])]] for r in [*rows, totals]]
    return [*_capped(shown[:-1]), shown[-1]]


def _class_rows(per_class: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for label, s in per_class.items():
        p, r = s.get("precision"), s.get("recall")
        f1 = None if p is None or r is None else (0.0 if p + r == 0 else 2 * p * r / (p + r))
        rows.append((label, _share(p), _share(r), _share(f1), str(s.get("support", 0))))
    return rows


# -- thumbnails ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thumbnail:
    """One misclassified test image as the report shows it.

    Attributes:
        uri: a ``data:image/jpeg`` URI, or "" when the image could not be read (``error`` says why).
    """

    path: str
    true_label: str
    predicted_label: str
    score: str
    true_score: str
    uri: str
    error: str


def _thumbnails(
    image_dir: str,
    wrong: Sequence[Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None,
    report_url: str = "",
    fetch_images: bool = False,
) -> list[Thumbnail]:
    def one(item: Mapping[str, Any]) -> Thumbnail:
        uri, error = "", ""
        try:
            url = report_input.thumbnail_url(image_dir, item["path"], report_url, fetch_images)
            uri = _thumbnail_uri(url, storage_options)
        except LastlayerError as exc:
            error = str(exc)
            log.warning("No thumbnail for %s in the report: %s", item["path"], exc)
        return Thumbnail(
            item["path"],
            item["true_label"],
            item["predicted_label"],
            _share(item.get("score")),
            _share(item.get("true_score")),
            uri,
            error,
        )

    with ThreadPoolExecutor(_READERS) as pool:  # HDFS reads are latency-bound
        return list(pool.map(one, wrong))


def _thumbnail_uri(url: str, storage_options: Mapping[str, Any] | None) -> str:
    """The image at ``url`` shrunk to :data:`THUMBNAIL_PX` as a JPEG ``data:`` URI.

    Raises:
        DataError, StorageError: it cannot be read or decoded.
    """
    if url.lower().startswith(("http://", "https://")):
        data = fetch.fetch(url, IMAGE_LIMITS, storage_options=storage_options, what="the image")
    else:  # a regular file only: a FIFO or a device is never opened
        data = storage.read_bytes(url, storage_options, IMAGE_LIMITS.max_bytes, "the image")
    img = open_image(data, _THUMBNAIL_PREP)
    scale = THUMBNAIL_PX / max(img.size)
    if scale >= 2:  # small images (Fashion-MNIST's 28 px) enlarged with crisp pixels
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.NEAREST)
    else:
        img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -- charts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Charts:
    """Draws the report's charts (:func:`_chart`), each read from ``memo`` when it holds the same
    chart of the same data drawn by the same code and matplotlib, else drawn and kept there."""

    memo: Memo | None = None

    def __call__(self, draw: Callable[..., bool], *args: Any) -> str | None:
        """``draw``'s chart of ``args`` (JSON data of the run summary), as :func:`_chart` returns it."""
        if self.memo is None:
            return _chart(draw, *args)
        import matplotlib

        code = code_digest("lastlayer.report", "lastlayer.trust")
        entry = memo_key(code, matplotlib.__version__, draw.__module__, draw.__qualname__, list(args))
        kept = self.memo.get(CHART_KIND, entry)
        if kept is not None and (kept == b"" or _SVG_URI.fullmatch(kept)):
            return kept.decode("ascii") or None
        uri = _chart(draw, *args)
        self.memo.put(CHART_KIND, entry, (uri or "").encode("ascii"))
        return uri


def _chart(draw: Callable[..., bool], *args: Any) -> str | None:
    """``draw(figure, *args)`` on a new matplotlib Figure (no pyplot state), as an SVG ``data:`` URI;
    ``None`` when ``draw`` returns False (too many classes to draw)."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained")
    if draw(fig, *args) is False:
        return None
    buf = io.BytesIO()
    # text as SVG text, not glyph outlines: a seventh of the report's time, and a smaller page
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short(label: str, width: int = 24) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _dataset(fig: Figure, labels: Sequence[str], counts: Mapping[str, Mapping[str, int]]) -> bool:
    """Horizontal bars per class, one segment per split."""
    if len(labels) > MAX_CHART_CLASSES:
        return False
    fig.set_size_inches(7.5, 1.2 + 0.32 * len(labels))
    ax = fig.subplots()
    left = [0] * len(labels)
    for split, colour in zip(SPLITS, ("#4c72b0", "#dd8452", "#55a868"), strict=True):
        widths = [counts[label].get(split, 0) for label in labels]
        ax.barh(range(len(labels)), widths, left=left, color=colour, label=split)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(labels)), [_short(lb) for lb in labels], parse_math=False)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    fig.legend(loc="outside upper center", ncols=len(SPLITS), fontsize="small", frameon=False)
    return True


def _curves(fig: Figure, curve: Mapping[str, Sequence[float | None]]) -> bool:
    """Accuracy and cross entropy of the training and validation batches over the steps."""
    from matplotlib.ticker import PercentFormatter

    fig.set_size_inches(10, 3.6)
    accuracy, entropy = fig.subplots(1, 2)
    steps = curve["step"]
    for ax, key, title in (
        (accuracy, "accuracy", "Accuracy"),
        (entropy, "cross_entropy", "Cross entropy (nats)"),
    ):
        _line(ax, steps, curve[f"train_{key}"], "train", "#4c72b0")
        _line(ax, steps, curve[f"validation_{key}"], "validation", "#dd8452")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    accuracy.yaxis.set_major_formatter(PercentFormatter(1.0))
    return True


def _line(ax: Axes, steps: Sequence[int], values: Sequence[float | None], name: str, colour: str) -> None:
    points = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color=colour, label=name, linewidth=1.4)


def _per_label(fig: Figure, per_label: Mapping[str, Mapping[str, Any]]) -> bool:
    """Horizontal bars per label: its precision, recall and average precision on the test split."""
    import numpy as np
    from matplotlib.ticker import PercentFormatter

    labels = list(per_label)
    if not labels or len(labels) > MAX_CHART_CLASSES:
        return False
    fig.set_size_inches(7.5, 1.4 + 0.5 * len(labels))
    ax = fig.subplots()
    at = np.arange(len(labels))
    kinds = (("precision", "#4c72b0"), ("recall", "#dd8452"), ("average_precision", "#55a868"))
    for i, (key, colour) in enumerate(kinds):
        values = [per_label[lb].get(key) or 0.0 for lb in labels]
        ax.barh(at + (i - 1) * 0.27, values, height=0.27, color=colour, label=key.replace("_", " "))
    ax.set_yticks(at, [_short(lb) for lb in labels], parse_math=False)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(fontsize="small", loc="lower right")
    return True


def _confusion(fig: Figure, labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> bool:
    """The confusion matrix coloured by each true class's share, annotated with counts."""
    import numpy as np

    n = len(labels)
    if n > MAX_CHART_CLASSES:
        return False
    counts = np.asarray(matrix, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 1.6 + 0.5 * n), 14.0)
    fig.set_size_inches(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    names = [_short(lb) for lb in labels]
    ax.set_xticks(range(n), names, rotation=45, ha="right", parse_math=False)
    ax.set_yticks(range(n), names, parse_math=False)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if n <= MAX_ANNOTATED_CLASSES:
        for (i, j), value in np.ndenumerate(counts):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(value)}", ha="center", va="center", color=colour, fontsize="small")
    return True
