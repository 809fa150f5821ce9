//! User-mode networking for service VMs (skeleton; being written).
