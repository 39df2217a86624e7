//! Where tensors live: `--device cpu|cuda|cuda:N`.
//!
//! The libtorch of the project's venv is a CUDA build, so the CUDA path compiles and runs
//! where a GPU exists; asking for CUDA on a machine without one fails at once, before any
//! model or data is loaded.

use tch::{Cuda, Device};

use crate::error::{Error, Result};

/// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N` and checks the device exists.
pub fn parse_device(spec: &str) -> Result<Device> {
    let device = match spec.trim().to_ascii_lowercase().as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => return Err(Error::config("device", format!("`{spec}`: expected cpu, cuda or cuda:N"))),
        },
    };
    check_available(device, spec)?;
    Ok(device)
}

fn check_available(device: Device, spec: &str) -> Result<()> {
    let Device::Cuda(n) = device else { return Ok(()) };
    let count = if Cuda::is_available() { Cuda::device_count() as usize } else { 0 };
    if n >= count {
        let have = match count {
            0 => "this machine has no CUDA device (or libtorch cannot see one)".to_string(),
            c => format!("this machine has {c} CUDA device(s): cuda:0..cuda:{}", c - 1),
        };
        return Err(Error::config("device", format!("`{spec}`: {have}; use --device cpu")));
    }
    Ok(())
}

/// The name a record stores for `device`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
