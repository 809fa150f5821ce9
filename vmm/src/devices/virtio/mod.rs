//! virtio devices over the virtio-mmio transport (being written).
