//! Reading the files datasets come in: pickles of numpy arrays, `.npy`/`.npz`, PNG and
//! JPEG images. Every failure is an [`Error`] naming the file and what was expected.

pub(crate) mod npy;
pub(crate) mod pickle;

use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use super::omniglot::AreaResizer;
use crate::{Error, Result};
use pickle::{NpArray, Value};

fn format_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Opens `path`, with [`Error::NotFound`] (carrying `hint`) when it does not exist.
fn open(path: &Path, hint: &str) -> Result<(File, u64)> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                path: path.to_path_buf(),
                hint: hint.to_string(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    let size = file
        .metadata()
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?
        .len();
    Ok((file, size))
}

/// Reads the pickle at `path`.
pub(crate) fn load_pickle(path: &Path, hint: &str) -> Result<Value> {
    let (file, size) = open(path, hint)?;
    pickle::read(BufReader::with_capacity(1 << 20, file), size)
        .map_err(|m| format_error(path, format!("not a readable pickle: {m}")))
}

/// Reads array `key` (`key.npy`) of the `.npz` archive at `path`.
pub(crate) fn load_npz(path: &Path, key: &str, hint: &str) -> Result<NpArray> {
    let (file, _) = open(path, hint)?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| format_error(path, format!("not a readable .npz (zip) archive: {e}")))?;
    let entry_name = format!("{key}.npy");
    let inner = Path::new(&format!("{}!{entry_name}", path.display())).to_path_buf();
    let names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let mut entry = archive.by_name(&entry_name).map_err(|_| {
        format_error(
            path,
            format!("no array {key:?} in the archive (it holds {names:?})"),
        )
    })?;
    let size = entry.size();
    npy::read(&mut entry, size).map_err(|m| format_error(&inner, m))
}

/// The entry `key` of the dict `value` read from `path`.
pub(crate) fn entry<'a>(value: &'a Value, key: &str, path: &Path) -> Result<&'a Value> {
    value.get(key).ok_or_else(|| {
        format_error(
            path,
            format!(
                "expected a dict with the key {key:?}, found {}",
                value.describe()
            ),
        )
    })
}

/// Takes the `uint8` image array `[N, H, W, C]` (C order) of entry `key` out of the dict
/// `value` read from `path`, checked against the sizes expected.
pub(crate) fn take_image_array(
    value: &mut Value,
    key: &str,
    path: &Path,
    side: Option<usize>,
) -> Result<ArrayD<u8>> {
    entry(value, key, path)?;
    let array = value.take(key).expect("the entry exists");
    image_array(array, key, path, side)
}

/// A `uint8` image array `[N, H, W, C]` (C order), checked against the sizes expected.
pub(crate) fn image_array(
    value: Value,
    what: &str,
    path: &Path,
    side: Option<usize>,
) -> Result<ArrayD<u8>> {
    let Value::Array(array) = value else {
        return Err(format_error(
            path,
            format!("{what}: expected a numpy array, found {}", value.describe()),
        ));
    };
    image_array_of(array, what, path, side)
}

/// Like [`image_array`], for an array already read.
pub(crate) fn image_array_of(
    array: NpArray,
    what: &str,
    path: &Path,
    side: Option<usize>,
) -> Result<ArrayD<u8>> {
    array.check().map_err(|m| format_error(path, m))?;
    if array.dtype.kind != b'u' || array.dtype.size != 1 {
        return Err(format_error(
            path,
            format!("{what}: expected dtype uint8, found {}", array.dtype.name()),
        ));
    }
    let shape = array.shape.clone();
    let ok = match shape[..] {
        [_, h, w, c] => {
            (c == 3 || c == 1) && side.is_none_or(|s| h == s && w == s) && h > 0 && w > 0
        }
        _ => false,
    };
    if !ok {
        let side = side.map_or("H×W".to_string(), |s| format!("{s}×{s}"));
        return Err(format_error(
            path,
            format!("{what}: expected images N×{side}×3 (uint8), found shape {shape:?}"),
        ));
    }
    if array.fortran {
        return Err(format_error(
            path,
            format!("{what}: Fortran-ordered arrays are not supported"),
        ));
    }
    let data = array.into_bytes();
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), data).expect("checked length"))
}

/// Integer labels (a list or an integer array) as non-negative values.
pub(crate) fn labels(value: &Value, what: &str, path: &Path) -> Result<Vec<i64>> {
    let ints = value.ints().ok_or_else(|| {
        format_error(
            path,
            format!(
                "{what}: expected a list or array of integers, found {}",
                value.describe()
            ),
        )
    })?;
    if let Some(l) = ints.iter().find(|&&l| l < 0) {
        return Err(format_error(path, format!("{what}: negative label {l}")));
    }
    Ok(ints)
}

/// Decodes a PNG or JPEG (told apart by their signatures) and resizes it by area
/// averaging to `height × width` (no resampling when the size is already that), writing
/// `channels` (1: gray, 3: RGB) planes `[C, H, W]` of bytes into `out`.
pub(crate) fn decode_image(
    bytes: &[u8],
    name: &str,
    (height, width): (usize, usize),
    channels: usize,
    out: &mut [u8],
) -> Result<()> {
    let image_error = |message: String| Error::Image {
        path: name.to_string(),
        message,
    };
    let (w, h, rgb) = if bytes.starts_with(b"\x89PNG") {
        decode_png(bytes).map_err(image_error)?
    } else if bytes.starts_with(&[0xff, 0xd8]) {
        decode_jpeg(bytes).map_err(image_error)?
    } else {
        return Err(image_error(
            "not a PNG or JPEG file (unknown signature)".into(),
        ));
    };
    // Planes as f32 of the source, then area resize per plane, rounded to bytes.
    let resizer = AreaResizer::new((h, w), (height, width));
    let mut plane = vec![0.0f32; height * width];
    for k in 0..channels {
        let value = |px: &[u8]| -> f32 {
            if channels == 1 {
                (0.299 * f32::from(px[0]) + 0.587 * f32::from(px[1]) + 0.114 * f32::from(px[2]))
                    .round()
            } else {
                f32::from(px[k])
            }
        };
        resizer.resize(
            |y, row| {
                for (x, r) in row.iter_mut().enumerate() {
                    *r = value(&rgb[(y * w + x) * 3..(y * w + x) * 3 + 3]);
                }
            },
            &mut plane,
        );
        for (o, &v) in out[k * height * width..(k + 1) * height * width]
            .iter_mut()
            .zip(&plane)
        {
            *o = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(())
}

/// Width, height and RGB bytes of a PNG (any colour type; transparency dropped).
fn decode_png(bytes: &[u8]) -> std::result::Result<(usize, usize, Vec<u8>), String> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let size = reader
        .output_buffer_size()
        .ok_or("image too large".to_string())?;
    let (w, h) = reader.info().size();
    if u64::from(w) * u64::from(h) > 1 << 28 {
        return Err(format!("image of {w}x{h} pixels is too large"));
    }
    let mut buffer = vec![0u8; size];
    let frame = reader.next_frame(&mut buffer).map_err(|e| e.to_string())?;
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("palette image was not expanded".into()),
    };
    let (w, h) = (w as usize, h as usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let row = buffer
            .get(y * frame.line_size..y * frame.line_size + w * channels)
            .ok_or("decoded buffer is smaller than the image")?;
        for px in row.chunks_exact(channels) {
            match channels {
                1 | 2 => rgb.extend([px[0]; 3]),
                _ => rgb.extend(&px[..3]),
            }
        }
    }
    Ok((w, h, rgb))
}

/// Width, height and RGB bytes of a JPEG (gray, RGB or CMYK).
fn decode_jpeg(bytes: &[u8]) -> std::result::Result<(usize, usize, Vec<u8>), String> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    let pixels = decoder.decode().map_err(|e| e.to_string())?;
    let info = decoder.info().ok_or("no image information")?;
    let (w, h) = (usize::from(info.width), usize::from(info.height));
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&g| [g; 3]).collect(),
        jpeg_decoder::PixelFormat::L16 => pixels.chunks_exact(2).flat_map(|g| [g[0]; 3]).collect(),
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::CMYK32 => pixels
            .chunks_exact(4)
            .flat_map(|p| {
                let k = 255 - u16::from(p[3]);
                let f = |c: u8| ((255 - u16::from(c)) * k / 255) as u8;
                [f(p[0]), f(p[1]), f(p[2])]
            })
            .collect(),
    };
    if rgb.len() != w * h * 3 || w == 0 || h == 0 {
        return Err("decoded pixels do not match the image size".into());
    }
    Ok((w, h, rgb))
}

/// Reads a whole file, with [`Error::NotFound`] carrying `hint` when it is missing.
pub(crate) fn read_file(path: &Path, hint: &str) -> Result<Vec<u8>> {
    let (mut file, size) = open(path, hint)?;
    let mut out = Vec::with_capacity(size.min(1 << 30) as usize);
    file.read_to_end(&mut out).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(out)
}
