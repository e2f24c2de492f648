// The gallery: every image the page received since it was opened, newest first, each with its parameters text.

// A base64 PNG (as the API sends images) or a data URL, as an <img> src.
export function imageSrc(image) {
  return image.startsWith("data:") ? image : `data:image/png;base64,${image}`;
}

// The response's `info` (a JSON string in the web UI's API) as an object.
export function parseInfo(info) {
  if (!info) return {};
  if (typeof info === "object") return info;
  try { return JSON.parse(info); } catch (_) { return {}; }
}

// The parameters text of an image when the server sent no infotexts: built from the echoed `parameters`.
function parametersText(params, seed) {
  const line = [
    `Steps: ${params.steps}`, `Sampler: ${params.sampler_name}`, `Schedule type: ${params.scheduler}`,
    `CFG scale: ${params.cfg_scale}`, `Seed: ${seed ?? params.seed}`, `Size: ${params.width}x${params.height}`,
  ];
  if (params.denoising_strength !== undefined) line.push(`Denoising strength: ${params.denoising_strength}`);
  const negative = params.negative_prompt ? `\nNegative prompt: ${params.negative_prompt}` : "";
  return `${params.prompt || ""}${negative}\n${line.join(", ")}`;
}

function button(text, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

export class Gallery {
  // `onSend(src)`: "Send to img2img"; `onSeed(seed)`: "Use seed".
  constructor(root, count, empty, { onSend, onSeed }) {
    Object.assign(this, { root, count, empty, onSend, onSeed });
    this.made = 0;
  }

  // Adds the images of a txt2img / img2img response; how many there were.
  addResponse(result) {
    const info = parseInfo(result.info);
    const texts = info.infotexts || [];
    const seeds = info.all_seeds || [];
    const images = result.images || [];
    images.forEach((image, i) => {
      this.add(image, texts[i] || parametersText(result.parameters || {}, seeds[i]), seeds[i] ?? info.seed);
    });
    return images.length;
  }

  add(image, text, seed) {
    this.made += 1;
    const number = this.made;
    const src = imageSrc(image);
    const hasSeed = seed !== undefined && seed !== null;
    const figure = document.createElement("figure");
    figure.className = "card";
    figure.id = `image-${number}`;
    const img = document.createElement("img");
    img.className = "gallery-image";
    img.src = src;
    img.alt = `Image ${number}: ${text.split("\n")[0]}`;
    const params = document.createElement("pre");
    params.className = "infotext";
    params.textContent = text;
    const actions = document.createElement("div");
    actions.className = "card-actions";
    actions.append(button("Send to img2img", "send-img2img secondary", () => this.onSend(src)));
    if (hasSeed) actions.append(button("Use seed", "use-seed secondary", () => this.onSeed(seed)));
    const download = document.createElement("a");
    download.className = "download";
    download.href = src;
    download.download = `ldm-${String(number).padStart(5, "0")}${hasSeed ? `-${seed}` : ""}.png`;
    download.textContent = "Download";
    actions.append(download);
    const caption = document.createElement("figcaption");
    caption.append(params, actions);
    figure.append(img, caption);
    this.root.prepend(figure);
    this.count.textContent = String(this.made);
    this.empty.hidden = true;
  }
}
