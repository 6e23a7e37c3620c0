//! A pool of f32 scratch storage buffers (the 16-bit GEMM outputs are computed into one, then
//! packed). Buffers come in power-of-two size classes and go back to the pool right after the
//! submission that uses them: wgpu orders every later use on the one queue after that
//! submission, so a reused buffer is never written while an earlier dispatch still reads it.

use std::collections::HashMap;
use std::sync::Mutex;

use super::WgpuDevice;
use crate::error::Result;

/// Pooled bytes beyond this are released instead of kept.
const MAX_POOLED_BYTES: u64 = 256 << 20;

#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    by_size: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
}

impl BufferPool {
    /// A storage buffer of at least `size` bytes (a multiple of 4), with undefined contents.
    pub(crate) fn take(&self, dev: &WgpuDevice, size: u64) -> Result<wgpu::Buffer> {
        let class = size_class(size, dev.limits.max_storage_buffer_binding_size);
        {
            let mut st = self.free.lock().expect("wgpu buffer pool lock poisoned");
            if let Some(b) = st.by_size.get_mut(&class).and_then(Vec::pop) {
                st.bytes -= class;
                return Ok(b);
            }
        }
        dev.create_buffer(
            "recfuse scratch",
            class,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            false,
        )
    }

    /// Returns a buffer obtained from `take` once its uses are submitted.
    pub(crate) fn give(&self, buf: wgpu::Buffer) {
        let mut st = self.free.lock().expect("wgpu buffer pool lock poisoned");
        let size = buf.size();
        if st.bytes + size <= MAX_POOLED_BYTES {
            st.bytes += size;
            st.by_size.entry(size).or_default().push(buf);
        }
    }
}

/// Power-of-two classes keep the pool small, but never round a bindable size past the binding
/// limit.
fn size_class(size: u64, max_binding: u64) -> u64 {
    let size = size.max(256);
    let p = size.next_power_of_two();
    if p <= max_binding {
        p
    } else {
        size.div_ceil(4) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn classes() {
        assert_eq!(size_class(4, 1 << 27), 256);
        assert_eq!(size_class(1000, 1 << 27), 1024);
        assert_eq!(size_class(100 << 20, 128 << 20), 128 << 20);
        assert_eq!(size_class(130 << 20, 129 << 20), 130 << 20);
    }
}
