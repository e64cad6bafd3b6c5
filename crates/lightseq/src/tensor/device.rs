use crate::backend::cuda::{self, CudaDevice};
use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Once};

/// An opened device that tensors live on.
#[derive(Clone)]
pub enum Device {
    /// The host CPU (f32 compute, rayon threads).
    Cpu,
    /// A CUDA GPU with its context, stream, cuBLASLt handle and kernels.
    Cuda(Arc<CudaDevice>),
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(d) => write!(f, "cuda:{} ({})", d.ordinal(), d.name()),
        }
    }
}

impl Device {
    /// True for a CUDA device.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Blocks until all queued work on the device has finished.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => d.synchronize(),
        }
    }
}

/// A device as the user names it: `cpu`, `cuda`, `cuda:N` or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The first GPU when one is usable, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(Error::Input(format!(
                    "unknown device `{s}` (expected cpu, cuda, cuda:N or auto)"
                ))),
            },
        }
    }
}

static CPU_NOTICE: Once = Once::new();

impl DeviceSpec {
    /// Opens the device. `Auto` falls back to the CPU, saying so once on stderr.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => Ok(Device::Cuda(CudaDevice::open(n)?)),
            DeviceSpec::Auto => match cuda::usable_device_count() {
                Ok(n) if n > 0 => match CudaDevice::open(0) {
                    Ok(d) => Ok(Device::Cuda(d)),
                    Err(e) => {
                        cpu_notice(&e);
                        Ok(Device::Cpu)
                    }
                },
                Ok(_) => {
                    cpu_notice(&Error::Device("no CUDA GPU found".into()));
                    Ok(Device::Cpu)
                }
                Err(e) => {
                    cpu_notice(&e);
                    Ok(Device::Cpu)
                }
            },
        }
    }
}

fn cpu_notice(why: &Error) {
    let why = match why {
        Error::Device(m) => m.clone(),
        other => other.to_string(),
    };
    CPU_NOTICE.call_once(|| eprintln!("lightseq: {why}; running on the CPU"));
}
