"""`ddcolor ui`: a local web playground for colorizing images with any model the platform knows.

Upload images (or pick the bundled samples), choose one or more models: ``champion``, ``challenger``, any registered
version of ``registry.model_name``, an official release from the weights cache, a checkpoint file, or an explicitly
labelled random-init network; choose the input size; compare before/after with a slider and the models side by side in
a grid; download the results. Registered versions show their metrics and gate decision from MLflow and link to their
run. Everything runs through `ddcolor.colorize.Colorizer` (and so `prepare_for_inference`), the pipeline of
`ddcolor colorize`.

Why FastAPI + one static page, not Gradio (the usual choice for colorization demos):

* FastAPI, starlette and uvicorn are already pinned in ``constraints.txt`` (MLflow and Prefect depend on them), so
  the playground adds no dependency tree and no version conflict with the prefect/mlflow pins; it needs only
  python-multipart for uploads.
* Gradio's front end loads fonts and sends analytics to the internet; the page here is vanilla HTML/CSS/JS with no
  CDN and no external fonts, so it works fully offline (air-gapped clusters, CI).
* A plain page has stable DOM ids, so the browser tests (headless Chromium via Playwright) stay simple and robust.

Modules: `ddcolor.ui.app` (the FastAPI app: endpoints, limits, auth), `ddcolor.ui.models` (model specs, the
registry catalogue, the LRU cache of loaded models with one lock per model), ``static/`` (the page).
"""

from ddcolor.ui.app import UiSettings, create_app

__all__ = ["UiSettings", "create_app"]
