//! ViT's patch embedding with its backward: the convolution (kernel = stride = patch) as a
//! GEMM over patches unfolded on the host, a CLS token, learned positions and dropout.
//!
//! Rows are [CLS, patch 0, patch 1, ...] per image. The unfolded input has a zero row at
//! each CLS position, so the bias-free GEMM leaves those rows zero; a two-row table
//! [cls_token; patch bias] looked up by row kind (0 for CLS, 1 for patches) adds the CLS
//! token and the projection's bias, and the position table is looked up by row index.

use super::layers::{as_dtype_of, Dropout};
use super::models::Loader;
use super::ops as tops;
use super::params::{Params, Pid};
use crate::error::{Error, Result};
use crate::models::vit::VitConfig;
use crate::ops::{self, Activation};
use crate::tensor::{DType, Tensor};

pub struct PatchEmb {
    /// [hidden, channels * ph * pw]
    proj: Pid,
    /// [hidden]
    bias: Pid,
    /// [1, hidden]
    cls: Pid,
    /// [1 + patches, hidden]
    pos: Pid,
    channels: usize,
    image: (usize, usize),
    patch: (usize, usize),
    hidden: usize,
}

pub struct PatchSaved {
    unfolded: Tensor,
    kinds: Tensor,
    positions: Tensor,
    drop: Option<u64>,
}

impl PatchEmb {
    pub(super) fn load(l: &mut Loader, c: &VitConfig) -> Result<Self> {
        let (h, ch) = (c.hidden_size, c.channels);
        let (ph, pw) = c.patch;
        let (gh, gw) = c.grid();
        let e = "vit.embeddings";
        Ok(PatchEmb {
            proj: l.reshaped(
                &format!("{e}.patch_embeddings.projection.weight"),
                &[h, ch, ph, pw],
                &[h, ch * ph * pw],
            )?,
            bias: l.p(&format!("{e}.patch_embeddings.projection.bias"), &[h])?,
            cls: l.reshaped(&format!("{e}.cls_token"), &[1, 1, h], &[1, h])?,
            pos: l.reshaped(
                &format!("{e}.position_embeddings"),
                &[1, 1 + gh * gw, h],
                &[1 + gh * gw, h],
            )?,
            channels: ch,
            image: c.image,
            patch: c.patch,
            hidden: h,
        })
    }

    fn tokens(&self) -> usize {
        1 + (self.image.0 / self.patch.0) * (self.image.1 / self.patch.1)
    }

    /// Images [channels, height, width] -> [1 + patches, b, hidden] (position-major, as
    /// every training activation).
    pub fn forward(
        &self,
        ps: &Params,
        drop: &Dropout,
        images: &[&[f32]],
    ) -> Result<(Tensor, PatchSaved)> {
        let (ch, (ih, iw), (ph, pw)) = (self.channels, self.image, self.patch);
        let (gh, gw) = (ih / ph, iw / pw);
        let (n, k, h) = (self.tokens(), ch * ph * pw, self.hidden);
        let b = images.len();
        let mut unf = vec![0f32; b * n * k];
        for (bi, px) in images.iter().enumerate() {
            if px.len() != ch * ih * iw {
                return Err(Error::Input(format!(
                    "image {}: {} pixel values, expected {ch} x {ih} x {iw}",
                    bi + 1,
                    px.len()
                )));
            }
            for gy in 0..gh {
                for gx in 0..gw {
                    let row = &mut unf[((1 + gy * gw + gx) * b + bi) * k..][..k];
                    for c in 0..ch {
                        for y in 0..ph {
                            let src = (c * ih + gy * ph + y) * iw + gx * pw;
                            row[(c * ph + y) * pw..][..pw].copy_from_slice(&px[src..src + pw]);
                        }
                    }
                }
            }
        }
        let dev = ps.device.clone();
        let unfolded = Tensor::from_f32(&unf, &[b * n, k], ps.dtype, &dev)?;
        let kinds: Vec<i32> = (0..n * b).map(|r| i32::from(r / b != 0)).collect();
        let positions: Vec<i32> = (0..n * b).map(|r| (r / b) as i32).collect();
        let kinds = Tensor::from_i32(&kinds, &[b * n], &dev)?;
        let positions = Tensor::from_i32(&positions, &[b * n], &dev)?;
        // The two-row table [cls; bias], built by scattering each into its row.
        let first = Tensor::from_i32(&[0], &[1], &dev)?;
        let second = Tensor::from_i32(&[1], &[1], &dev)?;
        let table = ops::add(
            &tops::embedding_backward(&first, ps.w(self.cls), 2, 1.0)?,
            &tops::embedding_backward(&second, ps.w(self.bias), 2, 1.0)?,
        )?;
        let table = as_dtype_of(table, ps.dtype)?;
        let x = ops::linear(&unfolded, ps.w(self.proj), None, Activation::None)?;
        let e = ops::embed(&[(&table, &kinds), (ps.w(self.pos), &positions)])?;
        let x = ops::add(&x, &e)?.reshape(&[n, b, h])?;
        let (x, off) = drop.apply(x, drop.hidden)?;
        Ok((
            x,
            PatchSaved {
                unfolded,
                kinds,
                positions,
                drop: off,
            },
        ))
    }

    pub fn backward(
        &self,
        ps: &mut Params,
        drop: &Dropout,
        s: PatchSaved,
        dy: Tensor,
    ) -> Result<()> {
        let dy = drop.backward(dy, drop.hidden, s.drop)?;
        let rows = s.kinds.len();
        let dy = dy.reshape(&[rows, self.hidden])?;
        ps.accumulate_weight_grad(self.proj, None, &dy, &s.unfolded)?;
        let dtable = tops::embedding_backward(&s.kinds, &dy, 2, 1.0)?;
        ps.accumulate(self.cls, &ops::index_select(&dtable, &[0])?)?;
        ps.accumulate(self.bias, &ops::index_select(&dtable, &[1])?)?;
        let dpos = tops::embedding_backward(&s.positions, &dy, self.tokens(), 1.0)?;
        ps.accumulate(self.pos, &dpos)?;
        debug_assert!(dtable.dtype() == DType::F32);
        Ok(())
    }
}
