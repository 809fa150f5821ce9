//! The cloudlet appliance agent (being written).
