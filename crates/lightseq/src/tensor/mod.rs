//! Tensors, element types and devices.
//!
//! A [`Tensor`] is a dense, row-major, contiguous array that lives on one [`Device`].
//! On the CPU, floating-point tensors are always stored and computed in f32; asking for
//! f16 or bf16 there rounds values to that type and widens them back, so the CPU reproduces
//! the precision of the weights without a half-precision arithmetic path. On CUDA the
//! storage has the requested type and kernels accumulate in f32.

mod device;
mod dtype;

pub use device::{Device, DeviceSpec};
pub use dtype::DType;

use crate::backend::cuda::{CudaDevice, CudaStorage};
use crate::error::{Error, Result};
use std::sync::Arc;

/// Where a tensor's elements live.
#[derive(Debug)]
pub(crate) enum Storage {
    /// f32 values (F32/F16/BF16 tensors on the CPU).
    CpuF32(Vec<f32>),
    /// Integer ids.
    CpuI32(Vec<i32>),
    /// Device memory; the dtype is the tensor's.
    Cuda(CudaStorage),
}

/// A dense row-major tensor.
#[derive(Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    pub(crate) storage: Storage,
}

impl Tensor {
    pub(crate) fn from_parts(shape: Vec<usize>, dtype: DType, storage: Storage) -> Self {
        Tensor {
            shape,
            dtype,
            storage,
        }
    }

    /// A tensor of `dtype` on `device` holding `data` (converted from f32).
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        check_len("from_f32", data.len(), shape)?;
        if dtype == DType::I32 {
            return Err(Error::op("from_f32", "use from_i32 for integer tensors"));
        }
        match device {
            Device::Cpu => {
                let v = dtype.round_f32(data);
                Ok(Tensor::from_parts(
                    shape.to_vec(),
                    dtype,
                    Storage::CpuF32(v),
                ))
            }
            Device::Cuda(dev) => {
                let s = dev.upload_f32(data, dtype)?;
                Ok(Tensor::from_parts(shape.to_vec(), dtype, Storage::Cuda(s)))
            }
        }
    }

    /// An i32 tensor on `device`.
    pub fn from_i32(data: &[i32], shape: &[usize], device: &Device) -> Result<Self> {
        check_len("from_i32", data.len(), shape)?;
        match device {
            Device::Cpu => Ok(Tensor::from_parts(
                shape.to_vec(),
                DType::I32,
                Storage::CpuI32(data.to_vec()),
            )),
            Device::Cuda(dev) => {
                let s = dev.upload_i32(data)?;
                Ok(Tensor::from_parts(
                    shape.to_vec(),
                    DType::I32,
                    Storage::Cuda(s),
                ))
            }
        }
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The tensor's element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the tensor lives on.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::CpuF32(_) | Storage::CpuI32(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.device().clone()),
        }
    }

    pub(crate) fn cuda_device(&self) -> Option<&Arc<CudaDevice>> {
        match &self.storage {
            Storage::Cuda(s) => Some(s.device()),
            _ => None,
        }
    }

    /// The same tensor with another shape of equal element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        check_len("reshape", self.len(), shape)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self
        })
    }

    /// Copies the values to the host as f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::CpuF32(v) => Ok(v.clone()),
            Storage::CpuI32(v) => Ok(v.iter().map(|&x| x as f32).collect()),
            Storage::Cuda(s) => s.download_f32(),
        }
    }

    /// Copies integer values to the host.
    pub fn to_i32_vec(&self) -> Result<Vec<i32>> {
        match &self.storage {
            Storage::CpuI32(v) => Ok(v.clone()),
            Storage::Cuda(s) if self.dtype == DType::I32 => s.download_i32(),
            _ => Err(Error::op("to_i32_vec", "tensor is not an i32 tensor")),
        }
    }

    /// f32 view of a CPU float tensor.
    pub(crate) fn cpu_f32(&self, op: &'static str) -> Result<&[f32]> {
        match &self.storage {
            Storage::CpuF32(v) => Ok(v),
            _ => Err(Error::op(op, "expected a float tensor on the CPU")),
        }
    }

    /// Integer view of a CPU id tensor.
    pub(crate) fn cpu_i32(&self, op: &'static str) -> Result<&[i32]> {
        match &self.storage {
            Storage::CpuI32(v) => Ok(v),
            _ => Err(Error::op(op, "expected an i32 tensor on the CPU")),
        }
    }

    pub(crate) fn cuda(&self, op: &'static str) -> Result<&CudaStorage> {
        match &self.storage {
            Storage::Cuda(s) => Ok(s),
            _ => Err(Error::op(op, "expected a CUDA tensor")),
        }
    }

    /// The same values on another device.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        match self.dtype {
            DType::I32 => Tensor::from_i32(&self.to_i32_vec()?, &self.shape, device),
            dt => Tensor::from_f32(&self.to_f32_vec()?, &self.shape, dt, device),
        }
    }
}

fn check_len(op: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len {
        return Err(Error::op(
            op,
            format!("{len} elements do not fill shape {shape:?} ({n} elements)"),
        ));
    }
    Ok(())
}
