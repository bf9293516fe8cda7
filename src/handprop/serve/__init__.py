"""handprop serve: a page to draw digits on, and the small JSON API behind it.

The page (``static/``: plain HTML, CSS and JavaScript, no CDN, so it works offline)
posts the canvas as a PNG while the user draws; the server prepares it exactly as
``handprop predict`` prepares an image (:func:`handprop.images.prepare_image`) and
answers with the class probabilities, the 28x28 input the network sees, a saliency map
from the network's own backward pass and its first layer's activity.

:mod:`handprop.serve.models` finds and explains models (NumPy only);
:mod:`handprop.serve.app` is the Starlette app, imported only when serving, since
Starlette and uvicorn are the optional ``serve`` extra.
"""

from handprop.serve.models import MAX_PIXELS, ServedModel, find_models

__all__ = ["MAX_PIXELS", "ServedModel", "find_models"]
