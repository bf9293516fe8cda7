"""handprop.analysis.figures: figures of a run or an experiment grid, as PNG files of
fixed pixel size.

===============  ======================================================================
``style``        sizes, colors, fonts, the axis scales; a figure made and saved as PNG
``run``          one run's figures: confusions, per-class scores, training curves,
                 misclassified samples, first layer, correct/incorrect, top confusions
``diagnostics``  inside training: per-layer diagnostics, several runs' curves overlaid
``grid``         an experiment grid's training curves and accuracy per parameter
``writing``      every figure of a run, grid or overlay built and written as PNG files
===============  ======================================================================

Their functions and classes are re-exported here; the constants of the style and of each
figure stay in their modules (``style.RC``, ``run.PER_CLASS_ZOOM_FROM``, ...).
"""

from handprop.analysis.figures.diagnostics import (
    ZERO_MARKER,
    diagnostics_figure,
    overlay_training_curves_figure,
)
from handprop.analysis.figures.grid import (
    GridLine,
    grid_accuracy_figure,
    grid_lines,
    grid_training_curves_figure,
    grid_varied_parameters,
    run_accuracy,
    run_parameter,
    run_styles,
)
from handprop.analysis.figures.run import (
    confusion_figure,
    correct_incorrect_figure,
    first_layer_figure,
    first_layer_images,
    misclassified_figure,
    per_class_figure,
    per_class_floor,
    top_confusions_figure,
    training_curves_figure,
)
from handprop.analysis.figures.style import (
    DPI,
    SIZES,
    PlainLogFormatter,
    first_layer_rows,
    misclassified_rows,
    pixel_size,
    png_bytes,
    save_png,
)
from handprop.analysis.figures.writing import (
    FigureSet,
    build_figures,
    build_grid_figures,
    build_overlay_figures,
    build_run_figures,
    diagnostics_figures,
    write_figures,
    write_overlay_figures,
)

__all__ = [
    "DPI",
    "SIZES",
    "ZERO_MARKER",
    "FigureSet",
    "GridLine",
    "PlainLogFormatter",
    "build_figures",
    "build_grid_figures",
    "build_overlay_figures",
    "build_run_figures",
    "confusion_figure",
    "correct_incorrect_figure",
    "diagnostics_figure",
    "diagnostics_figures",
    "first_layer_figure",
    "first_layer_images",
    "first_layer_rows",
    "grid_accuracy_figure",
    "grid_lines",
    "grid_training_curves_figure",
    "grid_varied_parameters",
    "misclassified_figure",
    "misclassified_rows",
    "overlay_training_curves_figure",
    "per_class_figure",
    "per_class_floor",
    "pixel_size",
    "png_bytes",
    "run_accuracy",
    "run_parameter",
    "run_styles",
    "save_png",
    "top_confusions_figure",
    "training_curves_figure",
    "write_figures",
    "write_overlay_figures",
]
