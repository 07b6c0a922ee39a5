//! Hardware readings for the screen: every GPU through NVML (each value optional; a missing
//! library or driver is a note, not an error), else CPU and RAM, and this process's memory.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use sysinfo::{Pid, ProcessesToUpdate, System};

#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Hardware {
    pub gpus: Vec<GpuReading>,
    /// Why there are no GPU readings (no NVML library, no driver, no device).
    pub gpu_note: Option<String>,
    /// All cores together, 0-100.
    pub cpu_percent: f32,
    pub cpu_cores: usize,
    pub ram_used: u64,
    pub ram_total: u64,
    /// This process's resident memory.
    pub process_rss: u64,
}

#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    pub utilization_percent: Option<u32>,
    pub memory_used: Option<u64>,
    pub memory_total: Option<u64>,
    pub temperature_c: Option<u32>,
}

/// Samples the hardware; keep one and call [`HardwareMonitor::sample`] every second or so
/// (CPU usage is measured between two samples).
pub struct HardwareMonitor {
    nvml: Result<Nvml, String>,
    system: System,
    pid: Option<Pid>,
}

impl Default for HardwareMonitor {
    fn default() -> Self {
        Self::new()
    }
}

impl HardwareMonitor {
    pub fn new() -> Self {
        let nvml = Nvml::init().map_err(|e| match e {
            NvmlError::LibloadingError(_) => "no GPU (no NVML library)".to_string(),
            NvmlError::DriverNotLoaded => "no GPU (NVIDIA driver not loaded)".to_string(),
            e => format!("no GPU ({e})"),
        });
        Self {
            nvml,
            system: System::new(),
            pid: sysinfo::get_current_pid().ok(),
        }
    }

    pub fn sample(&mut self) -> Hardware {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let process_rss = match self.pid {
            Some(pid) => {
                self.system
                    .refresh_processes(ProcessesToUpdate::Some(&[pid]), false);
                self.system.process(pid).map(|p| p.memory()).unwrap_or(0)
            }
            None => 0,
        };
        let (gpus, gpu_note) = match &self.nvml {
            Ok(nvml) => gpu_readings(nvml),
            Err(note) => (Vec::new(), Some(note.clone())),
        };
        Hardware {
            gpus,
            gpu_note,
            cpu_percent: self.system.global_cpu_usage(),
            cpu_cores: self.system.cpus().len(),
            ram_used: self.system.used_memory(),
            ram_total: self.system.total_memory(),
            process_rss,
        }
    }
}

fn gpu_readings(nvml: &Nvml) -> (Vec<GpuReading>, Option<String>) {
    let count = match nvml.device_count() {
        Ok(0) => return (Vec::new(), Some("no GPU (the driver lists none)".into())),
        Ok(n) => n,
        Err(e) => return (Vec::new(), Some(format!("no GPU ({e})"))),
    };
    let gpus = (0..count)
        .filter_map(|index| {
            let d = nvml.device_by_index(index).ok()?;
            let memory = d.memory_info().ok();
            Some(GpuReading {
                index,
                name: d.name().unwrap_or_else(|_| format!("GPU {index}")),
                utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                memory_used: memory.as_ref().map(|m| m.used),
                memory_total: memory.as_ref().map(|m| m.total),
                temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            })
        })
        .collect();
    (gpus, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_reads_its_memory_and_says_why_it_has_no_gpu() {
        let mut m = HardwareMonitor::new();
        let h = m.sample();
        assert!(h.ram_total > 0 && h.ram_used <= h.ram_total, "{h:?}");
        assert!(h.process_rss > 0, "{h:?}");
        assert!(h.cpu_cores > 0);
        // Either GPUs are listed or the reason there are none is.
        assert!(
            !h.gpus.is_empty()
                || h.gpu_note
                    .as_deref()
                    .is_some_and(|n| n.starts_with("no GPU ("))
        );
    }
}
