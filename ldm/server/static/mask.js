// The inpainting mask: painted with a round brush on a canvas laid over the init image, sent as a black and
// white PNG of the image's size (white = repaint).

const COLOUR = "#ffffff";   // shown through mix-blend-mode: difference (style.css), visible on any image

export class MaskPainter {
  // `brushSize()`: the brush diameter in image pixels; `enabled()`: whether painting is on.
  constructor(canvas, brushSize, enabled) {
    this.canvas = canvas;
    this.brushSize = brushSize;
    this.enabled = enabled;
    this.last = null;       // the last point of the stroke being painted
    this.painted = false;
    canvas.addEventListener("pointerdown", (event) => this.start(event));
    canvas.addEventListener("pointermove", (event) => { if (this.last) this.paintTo(this.point(event)); });
    canvas.addEventListener("pointerup", () => { this.last = null; });
    canvas.addEventListener("pointercancel", () => { this.last = null; });
  }

  context() {
    return this.canvas.getContext("2d", { willReadFrequently: true });
  }

  // A new, empty mask of `width` x `height` image pixels.
  resize(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  clear() {
    this.context().clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
  }

  // The pointer's position in image pixels (the canvas is shown scaled).
  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return {
      x: (event.clientX - box.left) * (this.canvas.width / box.width),
      y: (event.clientY - box.top) * (this.canvas.height / box.height),
    };
  }

  start(event) {
    if (!this.enabled() || event.button !== 0) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.last = null;
    this.paintTo(this.point(event));
  }

  paintTo(point) {
    const ctx = this.context();
    const from = this.last || point;
    ctx.strokeStyle = COLOUR;
    ctx.lineWidth = this.brushSize();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(point.x, point.y);
    ctx.stroke();
    this.last = point;
    this.painted = true;
  }

  // The mask as a PNG data URL: black, white where painted; null when nothing is painted.
  toDataURL() {
    const { width, height } = this.canvas;
    if (!this.painted || width < 2) return null;
    const painted = this.context().getImageData(0, 0, width, height).data;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const ctx = out.getContext("2d");
    const pixels = ctx.createImageData(width, height);
    let any = false;
    for (let i = 0; i < painted.length; i += 4) {
      const on = painted[i + 3] >= 128;
      any = any || on;
      const v = on ? 255 : 0;
      pixels.data[i] = v;
      pixels.data[i + 1] = v;
      pixels.data[i + 2] = v;
      pixels.data[i + 3] = 255;
    }
    if (!any) return null;
    ctx.putImageData(pixels, 0, 0);
    return out.toDataURL("image/png");
  }
}
