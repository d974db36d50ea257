//! The compressions of `header.tar*` and `data/NNNN.tar*`, named as `mender-artifact` names them.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

/// How the header and payload tars are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Plain tar (`.tar`).
    None,
    /// gzip (`.tar.gz`), level 6.
    Gzip,
    /// xz (`.tar.xz`), preset 6: `mender-artifact` calls it `lzma`.
    Lzma,
    /// Zstandard (`.tar.zst`), level 1.
    ZstdFast,
    /// Zstandard, level 7.
    ZstdBetter,
    /// Zstandard, level 11.
    ZstdBest,
}

impl Compression {
    /// Every compression, in the order `mender-artifact` lists them.
    pub const ALL: [Compression; 6] = [
        Compression::None,
        Compression::Gzip,
        Compression::Lzma,
        Compression::ZstdFast,
        Compression::ZstdBetter,
        Compression::ZstdBest,
    ];

    /// The name `mender-artifact --compression` takes.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Lzma => "lzma",
            Compression::ZstdFast => "zstd_fast",
            Compression::ZstdBetter => "zstd_better",
            Compression::ZstdBest => "zstd_best",
        }
    }

    /// What follows `.tar` in a member's name.
    pub fn suffix(self) -> &'static str {
        self.codec().suffix()
    }

    pub(crate) fn codec(self) -> Codec {
        match self {
            Compression::None => Codec::None,
            Compression::Gzip => Codec::Gzip,
            Compression::Lzma => Codec::Xz,
            Compression::ZstdFast | Compression::ZstdBetter | Compression::ZstdBest => Codec::Zstd,
        }
    }

    pub(crate) fn encoder<W: Write>(self, inner: W) -> io::Result<Encoder<W>> {
        Ok(match self {
            Compression::None => Encoder::None(inner),
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                inner,
                flate2::Compression::new(6),
            )),
            Compression::Lzma => Encoder::Xz(liblzma::write::XzEncoder::new(inner, 6)),
            Compression::ZstdFast => Encoder::Zstd(zstd::stream::write::Encoder::new(inner, 1)?),
            Compression::ZstdBetter => Encoder::Zstd(zstd::stream::write::Encoder::new(inner, 7)?),
            Compression::ZstdBest => Encoder::Zstd(zstd::stream::write::Encoder::new(inner, 11)?),
        })
    }
}

impl Default for Compression {
    /// gzip, as `mender-artifact` defaults to.
    fn default() -> Self {
        Compression::Gzip
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown compression {s:?}: use one of {}",
                    Compression::ALL.map(Compression::name).join(", ")
                )
            })
    }
}

/// A compression as a reader sees it: only the member's name suffix tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Codec {
    None,
    Gzip,
    Xz,
    Zstd,
}

impl Codec {
    pub(crate) const ALL: [Codec; 4] = [Codec::None, Codec::Gzip, Codec::Xz, Codec::Zstd];

    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Codec::None => "",
            Codec::Gzip => ".gz",
            Codec::Xz => ".xz",
            Codec::Zstd => ".zst",
        }
    }

    /// The codec of a member named `{stem}.tar{suffix}`, if the name is one.
    pub(crate) fn of_member(name: &str, stem: &str) -> Option<Codec> {
        let rest = name.strip_prefix(stem)?.strip_prefix(".tar")?;
        Codec::ALL.into_iter().find(|c| c.suffix() == rest)
    }

    pub(crate) fn decoder<'a, R: Read + 'a>(self, inner: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Codec::None => Box::new(inner),
            Codec::Gzip => Box::new(flate2::read::MultiGzDecoder::new(inner)),
            Codec::Xz => Box::new(liblzma::read::XzDecoder::new(inner)),
            Codec::Zstd => Box::new(zstd::stream::read::Decoder::new(inner)?),
        })
    }
}

/// A compressing writer; `finish` must be called to write the compression's trailer.
pub(crate) enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Xz(liblzma::write::XzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for c in Compression::ALL {
            assert_eq!(c.name().parse::<Compression>(), Ok(c));
        }
        assert!("brotli".parse::<Compression>().is_err());
    }

    #[test]
    fn member_suffixes() {
        assert_eq!(Codec::of_member("header.tar", "header"), Some(Codec::None));
        assert_eq!(
            Codec::of_member("header.tar.gz", "header"),
            Some(Codec::Gzip)
        );
        assert_eq!(
            Codec::of_member("data/0000.tar.xz", "data/0000"),
            Some(Codec::Xz)
        );
        assert_eq!(
            Codec::of_member("data/0000.tar.zst", "data/0000"),
            Some(Codec::Zstd)
        );
        assert_eq!(Codec::of_member("header.tar.bz2", "header"), None);
        assert_eq!(Codec::of_member("header.tarx", "header"), None);
    }

    #[test]
    fn every_compression_round_trips() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for c in Compression::ALL {
            let mut enc = c.encoder(Vec::new()).expect("encoder");
            enc.write_all(&data).expect("write");
            let packed = enc.finish().expect("finish");
            let mut out = Vec::new();
            c.codec()
                .decoder(&packed[..])
                .expect("decoder")
                .read_to_end(&mut out)
                .expect("decode");
            assert_eq!(out, data, "{c}");
        }
    }
}
