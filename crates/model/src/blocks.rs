//! GGUF's quantized blocks as typed views, in ggml's layouts (`ggml-common.h`): the kernels read
//! a block's fields by name, not at byte offsets written by hand. Each view wraps a fixed-size
//! array, so a field is a constant slice of it and costs no bounds check; [`blocks`] cuts a row
//! into them. Scales stay raw f16 bits: each kernel converts them its own way.

/// A row of quantized weights as its `N`-byte blocks (a trailing partial block is ignored:
/// rows hold whole blocks).
#[inline(always)]
pub(crate) fn blocks<const N: usize>(row: &[u8]) -> &[[u8; N]] {
    row.as_chunks::<N>().0
}

#[inline(always)]
fn bits(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn part<const LEN: usize>(b: &[u8], at: usize) -> &[u8; LEN] {
    b[at..at + LEN]
        .try_into()
        .expect("a constant range of a block")
}

/// A block type: its view over `BYTES` bytes, and accessors for its f16 scales (`f16 d @ 0`:
/// the bits at byte 0) and its byte arrays (`bytes qs: 16 @ 2`: bytes 2..18).
macro_rules! block {
    ($(#[$doc:meta])* $name:ident, $bytes:literal {
        $(f16 $h:ident @ $h_at:literal;)*
        $(bytes $b:ident: $len:literal @ $b_at:literal;)*
    }) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        pub(crate) struct $name<'a>(pub &'a [u8; $bytes]);

        impl<'a> $name<'a> {
            pub const BYTES: usize = $bytes;
            $(
                #[inline(always)]
                pub fn $h(self) -> u16 {
                    bits(self.0, $h_at)
                }
            )*
            $(
                #[inline(always)]
                pub fn $b(self) -> &'a [u8; $len] {
                    part(self.0, $b_at)
                }
            )*
        }
    };
}

block!(
    /// Q4_0, 18 bytes: scale d, then 16 bytes of nibbles (weight i the low nibble of byte i,
    /// weight 16 + i its high one); a weight is d·(q − 8).
    Q4_0, 18 { f16 d @ 0; bytes qs: 16 @ 2; }
);
block!(
    /// Q4_1, 20 bytes: scale d, minimum m, 16 bytes of nibbles as Q4_0's; a weight is d·q + m.
    Q4_1, 20 { f16 d @ 0; f16 m @ 2; bytes qs: 16 @ 4; }
);
block!(
    /// Q5_0, 22 bytes: scale d, the 32 fifth bits (bit i of weight i), 16 bytes of nibbles as
    /// Q4_0's; a weight is d·(q − 16).
    Q5_0, 22 { f16 d @ 0; bytes qh_bytes: 4 @ 2; bytes qs: 16 @ 6; }
);
block!(
    /// Q8_0, 34 bytes: scale d, 32 signed bytes; a weight is d·q.
    Q8_0, 34 { f16 d @ 0; bytes qs: 32 @ 2; }
);
block!(
    /// Q4_K, 144 bytes for 256 weights in 8 sub-blocks of 32: super-scales d and dmin, 12 bytes
    /// of 6-bit sub-block scales and minimums (`quant::scale_min_k4`), then 4 chunks of 32
    /// bytes whose low nibbles are sub-block 2c and high nibbles 2c + 1; a weight is
    /// d·scale·q − dmin·min.
    Q4K, 144 { f16 d @ 0; f16 dmin @ 2; bytes scales: 12 @ 4; }
);
block!(
    /// Q6_K, 210 bytes for 256 weights in two halves of 128: per half 64 bytes of low nibbles
    /// (`ql`), 32 bytes of high 2-bit pairs (`qh`) and 8 signed scales, one per 16 weights;
    /// then the super-scale d; a weight is d·scale·(q − 32).
    Q6K, 210 { f16 d @ 208; }
);

impl Q5_0<'_> {
    /// The fifth bits, bit i for weight i.
    #[inline(always)]
    pub fn qh(self) -> u32 {
        u32::from_le_bytes(*self.qh_bytes())
    }
}

impl<'a> Q4K<'a> {
    /// Chunk `c` (0..4): the nibbles of sub-blocks 2c and 2c + 1.
    #[inline(always)]
    pub fn chunk(self, c: usize) -> &'a [u8; 32] {
        &self.0[16..].as_chunks::<32>().0[c]
    }
}

impl<'a> Q6K<'a> {
    /// Half `h`'s low 4 bits of its 128 weights.
    #[inline(always)]
    pub fn ql(self, h: usize) -> &'a [u8; 64] {
        &self.0[..128].as_chunks::<64>().0[h]
    }
    /// Half `h`'s high 2 bits of its 128 weights.
    #[inline(always)]
    pub fn qh(self, h: usize) -> &'a [u8; 32] {
        &self.0[128..192].as_chunks::<32>().0[h]
    }
    /// Half `h`'s 8 scales (signed bytes).
    #[inline(always)]
    pub fn scales(self, h: usize) -> &'a [u8; 8] {
        &self.0[192..208].as_chunks::<8>().0[h]
    }
}
