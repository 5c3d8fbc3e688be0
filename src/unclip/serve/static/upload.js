// The user's own picture as a gallery card, from the file input or dropped anywhere on the page; Variations
// and Inpaint then work on it as on a generated card (app.js, loaded before this file, holds the gallery).
// It stays in the browser (a blob: URL) until it is varied or inpainted.
//
// The API takes square PNGs under 4 MB (docs/server.md, "Uploads"). A square PNG within the limits is kept
// byte for byte (the server judges it, and says so if it refuses it); anything else the browser can decode
// (JPEG, WebP, a non-square or very large PNG) is cropped to the square at its centre, shrunk to at most
// UPLOAD_SIDE, and saved as a PNG, and the page says what it did. What the browser cannot decode is refused
// here, before any request, and so is a damaged PNG, of which the browser draws what it can without a word
// (a cut-off download's first rows): the server would refuse it (`pngDamage`). So is a cut-off JPEG, which the
// browser draws down to where its data stops and grey below (a progressive one blurred): saved as a PNG, that
// would be sent as the picture (`jpegDamage`).
"use strict";

const UPLOAD_SIDE = 1024;            // more than any model reads: the server shrinks uploads to its working side
const MAX_READ_BYTES = 64 * 2 ** 20; // larger files are refused before the browser tries to decode them
const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const JPEG_SIGNATURE = [0xff, 0xd8, 0xff];  // start of image, then the first segment's marker
const PNG_CHANNELS = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 };  // by colour type: grey, RGB, palette, grey + alpha, RGBA
const ADAM7 = [[0, 0, 8, 8], [4, 0, 8, 8], [0, 4, 4, 8], [2, 0, 4, 4], [0, 2, 2, 4], [1, 0, 2, 2], [0, 1, 1, 2]];
const AGAIN = "Download or save the image again and upload the whole file.";

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

// "PNG", "JPEG" or null (another format), from the file's first bytes
async function imageKind(file) {
  const head = new Uint8Array(await file.slice(0, 8).arrayBuffer());
  const starts = (signature) => signature.every((byte, i) => head[i] === byte);
  return starts(PNG_SIGNATURE) ? "PNG" : starts(JPEG_SIGNATURE) ? "JPEG" : null;
}

let crcTable = null;

function crc32(bytes) {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = crcTable[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// bytes of filtered scanlines (a filter byte per row) a width × height PNG inflates to
function rawSize(width, height, bitsPerPixel, interlaced) {
  const rows = (w, h) => (w <= 0 || h <= 0 ? 0 : h * (1 + Math.ceil((w * bitsPerPixel) / 8)));
  if (!interlaced) return rows(width, height);
  return ADAM7.reduce((sum, [x0, y0, dx, dy]) => sum + rows(Math.ceil((width - x0) / dx),
                                                            Math.ceil((height - y0) / dy)), 0);
}

// { length, broken }: how many bytes the zlib stream `parts` inflates to (reading no further once past
// `limit`), and whether it broke off (corrupt, or ending unfinished) before that
async function inflated(parts, limit) {
  const reader = new Blob(parts).stream().pipeThrough(new DecompressionStream("deflate")).getReader();
  let length = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return { length, broken: false };
      length += value.length;
      if (length >= limit) { reader.cancel().catch(() => {}); return { length, broken: false }; }
    }
  } catch {
    return { length, broken: true };
  }
}

// What is wrong with a PNG the browser has decoded (null: nothing). It draws a file cut off part way, or with
// damaged bytes, as far as it can; the server refuses it (docs/server.md, "Uploads"). Checked as the server
// does: every chunk whole, each but the pixel data (IDAT) matching its checksum, and the pixel stream
// inflating to every row the header declares (a missing closing IEND alone is no damage).
async function pngDamage(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  const view = new DataView(bytes.buffer);
  const cut = "the file is cut off before its end (only its first rows could be drawn), as a download or copy "
    + `that stopped early is. ${AGAIN}`;
  let offset = PNG_SIGNATURE.length, header = null;
  const stream = [];
  for (;;) {
    if (offset === bytes.length && stream.length) break;  // no IEND after whole chunks: the pixels decide, as on the server
    if (offset + 12 > bytes.length) return cut;
    const length = view.getUint32(offset);
    const end = offset + 12 + length;  // length, type, data, checksum
    if (end > bytes.length) return cut;
    const kind = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
    // the pixel data's checksums are not checked: the server (Pillow) reads IDAT without them, and the
    // inflate below finds damaged pixel data
    if (kind !== "IDAT" && crc32(bytes.subarray(offset + 4, end - 4)) !== view.getUint32(end - 4)) {
      return `its bytes are damaged (its ${JSON.stringify(kind)} chunk does not match its checksum). ${AGAIN}`;
    }
    if (kind === "IHDR" && length >= 13) header = bytes.subarray(offset + 8, offset + 21);
    else if (kind === "IDAT") stream.push(bytes.subarray(offset + 8, end - 4));
    else if (kind === "IEND") break;
    offset = end;
  }
  if (header === null || !(header[9] in PNG_CHANNELS)) return `its header is damaged. ${AGAIN}`;
  if (typeof DecompressionStream === "undefined") return null;  // an older browser: the server judges the rest
  const h = new DataView(header.buffer, header.byteOffset, 13);
  const expected = rawSize(h.getUint32(0), h.getUint32(4), PNG_CHANNELS[header[9]] * header[8], header[12] === 1);
  const pixels = await inflated(stream, expected);
  if (pixels.length >= expected) return null;
  return `its pixel data ${pixels.broken ? "is broken off" : "ends"} before the last row. ${AGAIN}`;
}

// What is wrong with a JPEG the browser has decoded (null: nothing): cut off before its end-of-image marker,
// as a download that stopped early is, it is drawn down to where its data stops and grey below (a progressive
// one whole but blurred, from the scans it has). Its segments are walked by their lengths (so an EXIF
// thumbnail's own end marker, inside its APP1 segment, is skipped), and each scan's coded data up to the marker
// after it (FF 00 is a data byte, FF D0-D7 a restart), until the end-of-image marker; bytes after that, which
// some cameras write, are not read.
async function jpegDamage(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  const cut = "the file is cut off before its end (what is missing would be drawn grey, or blurred), as a download "
    + `or copy that stopped early is. ${AGAIN}`;
  let offset = 2;  // past the start-of-image marker
  for (;;) {
    while (offset < bytes.length && bytes[offset] !== 0xff) offset++;  // stray bytes, which decoders skip
    while (offset < bytes.length && bytes[offset] === 0xff) offset++;  // fill bytes before a marker
    if (offset >= bytes.length) return cut;
    const marker = bytes[offset++];
    if (marker === 0xd9) return null;  // end of image
    if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd8)) continue;  // markers without a length
    if (offset + 2 > bytes.length) return cut;
    offset += (bytes[offset] << 8) | bytes[offset + 1];  // the length counts its own two bytes
    if (offset > bytes.length) return cut;
    if (marker !== 0xda) continue;
    for (;;) {  // start of scan: coded data up to the next marker
      offset = bytes.indexOf(0xff, offset);
      if (offset < 0 || offset + 1 >= bytes.length) return cut;
      const next = bytes[offset + 1];
      if (next === 0x00 || (next >= 0xd0 && next <= 0xd7)) offset += 2;
      else if (next === 0xff) offset += 1;
      else break;
    }
  }
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
  const kind = await imageKind(file), png = kind === "PNG";
  const damage = png ? await pngDamage(file) : kind === "JPEG" ? await jpegDamage(file) : null;
  if (damage) throw new Error(`"${file.name}" is a damaged ${kind}: ${damage}`);
  const width = img.naturalWidth, height = img.naturalHeight;
  const limit = state.info ? state.info.limits.image_bytes : 4 * 2 ** 20;
  if (width === height && width <= 4096 && file.size < limit && png) {
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
