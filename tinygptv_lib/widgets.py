"""A chat widget for the notebooks: pick a shipped image or upload one, ask, watch the answer stream
in; boxes in the answer are drawn on the image.

    from tinygptv_lib.widgets import ChatWidget
    ChatWidget.from_checkpoint("runs/course")      # or ChatWidget(model)

Everything is plain ipywidgets state, so it builds (and `send` answers) without a display, which
is how the tests drive it.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Optional

import ipywidgets as widgets

from .data import world as W
from .data.images import ImageLoadError, load_image
from .infer.boxes import draw_answer, figure_png
from .infer.chat import ChatSession, default_template, load_chat_model
from .infer.generate import DEMO_SAMPLING, TASKS, TEMPLATES

PHOTOS = Path(__file__).resolve().parents[1] / "data_samples" / "photos"


def shipped_images(n_scenes: int = 3) -> dict[str, Callable]:
    """Name -> loader of the images offered: the shipped photos (when the repository is there) and a
    few shapes-world scenes (always: they are drawn, not shipped)."""
    images: dict[str, Callable] = {}
    for path in sorted(PHOTOS.glob("*.jpg")) + sorted(PHOTOS.glob("*.png")):
        images[f"photo: {path.name}"] = lambda path=path: load_image(path)
    for i in range(n_scenes):
        images[f"shapes world: scene {i + 1}"] = lambda i=i: W.make_scene(W.derive_seed(0, "widget", i), 224).image
    return images


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ChatWidget:
    """The widget; `.box` is the ipywidgets layout, `send()` asks programmatically and returns the answer."""

    def __init__(self, model, tokenizer=None, *, template: str = "stage4", images: Optional[dict] = None,
                 max_new_tokens: int = 64):
        self.session = ChatSession(model, tokenizer, template)
        self.images = dict(images) if images is not None else shipped_images()
        self.image = None
        self.answer = ""
        self.picker = widgets.Dropdown(options=list(self.images), description="image")
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="upload")
        self.view = widgets.Image(format="png", width=320)
        self.template = widgets.Dropdown(options=list(TEMPLATES), value=template, description="template")
        self.task = widgets.Dropdown(options=[("(none)", "")] + [(f"[{t}]", t) for t in TASKS], description="task")
        self.question = widgets.Text(placeholder="Ask about the image", description="question",
                                     layout=widgets.Layout(width="60%"))
        self.sample = widgets.Checkbox(description=f"sample like the original demo (top-p {DEMO_SAMPLING['top_p']}, "
                                                   f"repetition penalty {DEMO_SAMPLING['repetition_penalty']})")
        self.seed = widgets.IntText(value=0, description="seed")
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=4, max=256, description="max tokens")
        self.button = widgets.Button(description="send", button_style="primary")
        self.output = widgets.Output(layout=widgets.Layout(border="1px solid #ccc", min_height="3em"))
        self.status = widgets.HTML()

        self.picker.observe(lambda change: self.select(change["new"]), names="value")
        self.upload.observe(self._on_upload, names="value")
        self.template.observe(self._on_template, names="value")
        self.button.on_click(lambda _: self.send())
        self._on_template({"new": template})
        self.box = widgets.VBox([
            widgets.HBox([self.picker, self.upload]),
            self.view,
            widgets.HBox([self.template, self.task]),
            widgets.HBox([self.question, self.button]),
            widgets.HBox([self.sample, self.seed, self.max_new_tokens]),
            self.output,
            self.status,
        ])
        if self.images:
            self.select(next(iter(self.images)))

    @classmethod
    def from_checkpoint(cls, checkpoint=None, **kwargs) -> "ChatWidget":
        """Build the model as `tinygptv chat` does (final.pt, a stage folder or a course folder)."""
        model, stage = load_chat_model(checkpoint)
        return cls(model, template=kwargs.pop("template", default_template(stage)), **kwargs)

    # ----------------------------------------------------------------- images
    def select(self, name: str) -> None:
        """Show one of the offered images and encode it for the questions to come."""
        self.set_image(self.images[name]())

    def set_image(self, image) -> None:
        self.image = image
        self.session.set_image(image)
        self.view.value = _png(image)
        self.output.outputs = ()
        self.status.value = ""

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0] if isinstance(files, (tuple, list)) else next(iter(files.values()))  # ipywidgets 8 / 7
        name = item.get("name") or item.get("metadata", {}).get("name", "upload")
        try:
            self.set_image(load_image(bytes(item["content"]), name=name))
        except ImageLoadError as e:
            self.status.value = f"<span style='color:#b00'>{_escape(str(e))}</span>"

    def _on_template(self, change) -> None:
        stage3 = change["new"] == "stage3"  # stage 3 was trained without task identifiers
        if stage3:
            self.task.value = ""
        self.task.disabled = stage3

    # ----------------------------------------------------------------- asking
    def send(self, question: Optional[str] = None) -> str:
        """Ask (the question box's text by default); the answer streams into the output area."""
        q = self.question.value if question is None else question
        self.output.outputs = ()
        self.status.value = ""
        self.session.template = self.template.value
        options = {"max_new_tokens": int(self.max_new_tokens.value)}
        if self.sample.value:
            options.update(DEMO_SAMPLING, seed=int(self.seed.value))
        self.button.disabled = True
        try:
            self.answer = self.session.ask(q, self.task.value or None, callback=self.output.append_stdout, **options)
        except ValueError as e:  # an empty question, a task the template cannot take
            self.status.value = f"<span style='color:#b00'>{_escape(str(e))}</span>"
            return ""
        finally:
            self.button.disabled = False
        fig = draw_answer(self.image, self.answer, label=q if self.task.value == "refer" else None)
        self.view.value = figure_png(fig) if fig is not None else _png(self.image)
        self.status.value = "boxes drawn on the image" if fig is not None else ""
        return self.answer

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
