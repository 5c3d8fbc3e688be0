// The user's own picture as a gallery card, from the file input or dropped anywhere on the page; Variations
// and Inpaint then work on it as on a generated card (app.js, loaded before this file, holds the gallery).
// It stays in the browser (a blob: URL) until it is varied or inpainted.
//
// The API takes square PNGs under 4 MB (docs/server.md, "Uploads"). A square PNG within the limits is kept
// byte for byte (the server judges it, and says so if it is damaged); anything else the browser can decode
// (JPEG, WebP, a non-square or very large PNG) is cropped to the square at its centre, shrunk to at most
// UPLOAD_SIDE, and saved as a PNG, and the page says what it did. What the browser cannot decode is refused
// here, before any request.
"use strict";

const UPLOAD_SIDE = 1024;            // more than any model reads: the server shrinks uploads to its working side
const MAX_READ_BYTES = 64 * 2 ** 20; // larger files are refused before the browser tries to decode them
const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

function uploadCaption(upload) {
  const { side, width, height } = upload;
  if (width === side && height === side) return `uploaded · ${side}×${side}`;
  return `uploaded · ${side}×${side}, ${width === height ? "shrunk" : "cropped"} from ${width}×${height}`;
}

function megabytes(bytes) {
  return `${Number((bytes / 2 ** 20).toFixed(1))} MB`;  // 4 MB, 4.3 MB
}

async function decodeImage(file) {
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.src = url;
  try {
    await img.decode();
    return img;
  } catch {
    throw new Error(`"${file.name}" could not be read as an image: the file is damaged, or in a format this `
      + "browser cannot open (PNG, JPEG, WebP and GIF work)");
  } finally {
    URL.revokeObjectURL(url);
  }
}

async function isPng(file) {
  const head = new Uint8Array(await file.slice(0, 8).arrayBuffer());
  return PNG_SIGNATURE.every((byte, i) => head[i] === byte);
}

function canvasPng(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// { blob, side, width, height, note }: `file` as a square PNG the server accepts (side²), its own size, and
// what was done to it (null: nothing)
async function squarePng(file) {
  if (file.size > MAX_READ_BYTES) {
    throw new Error(`"${file.name}" is ${megabytes(file.size)}: the page reads images up to `
      + `${megabytes(MAX_READ_BYTES)}`);
  }
  const img = await decodeImage(file);
  const width = img.naturalWidth, height = img.naturalHeight;
  const limit = state.info ? state.info.limits.image_bytes : 4 * 2 ** 20;
  if (width === height && width <= 4096 && file.size < limit && await isPng(file)) {
    return { blob: file, side: width, width, height, note: null };
  }
  const crop = Math.min(width, height);
  let side = Math.min(crop, UPLOAD_SIDE), blob;
  for (;;) {  // a photo's 1024² PNG is rarely over the limit; noise can be
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = side;
    const context = canvas.getContext("2d");
    context.imageSmoothingQuality = "high";
    context.drawImage(img, (width - crop) / 2, (height - crop) / 2, crop, crop, 0, 0, side, side);
    blob = await canvasPng(canvas);
    if (blob.size < limit || side <= 64) break;
    side = Math.floor(side / 2);
  }
  const done = [];
  if (width !== height) done.push(`cropped to the ${crop}×${crop} square at its centre`);
  if (side < crop) done.push(`shrunk to ${side}×${side}`);
  const what = done.length ? done.join(" and ") + ", and saved" : "saved";
  const note = `"${file.name}" (${width}×${height}) was ${what} as a PNG: the server takes square PNGs under `
    + `${megabytes(limit)}.`;
  return { blob, side, width, height, note };
}

async function uploadFiles(files) {
  const notes = [], errors = [];
  let added = 0;
  for (const file of files) {
    try {
      const { blob, side, width, height, note } = await squarePng(file);
      const url = URL.createObjectURL(blob);  // kept for the page's life, as the card is
      addCard({ url, seed: null }, { label: file.name, prompt: null, upload: { name: file.name, side, width, height } },
              null);
      if (note) notes.push(note);
      added += 1;
    } catch (err) {
      errors.push(err.message);
    }
  }
  showError(errors.join(" "));
  if (notes.length) showNotice(notes.join(" "));
  else if (!errors.length) showNotice("");
  if (added) {
    $("announce").textContent = `${added} uploaded ${added === 1 ? "image" : "images"} added to the gallery`;
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("upload").addEventListener("change", async (e) => {
    await uploadFiles([...e.target.files]);
    e.target.value = "";  // choosing the same file again is a new upload
  });
  // a file dragged anywhere over the page: the drop zone shows until it is dropped or leaves the window
  const carriesFiles = (e) => e.dataTransfer && e.dataTransfer.types.includes("Files");
  let depth = 0;  // dragenter/dragleave pair up over every element crossed
  document.addEventListener("dragenter", (e) => {
    if (carriesFiles(e)) { depth += 1; $("drop-zone").hidden = false; }
  });
  document.addEventListener("dragleave", (e) => {
    if (carriesFiles(e) && (depth = Math.max(0, depth - 1)) === 0) $("drop-zone").hidden = true;
  });
  document.addEventListener("dragover", (e) => {
    if (carriesFiles(e)) { e.preventDefault(); e.dataTransfer.dropEffect = "copy"; }
  });
  document.addEventListener("drop", (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();  // the browser would open the file instead of the page
    depth = 0;
    $("drop-zone").hidden = true;
    uploadFiles([...e.dataTransfer.files]);
  });
});
