//! omni-image: builds bootable appliance images for a self-hosted Omni stack and publishes
//! them to Proxmox VE.
//!
//! The build is a straight line of steps (see [`build`]): bootstrap a root tree from
//! distribution packages, lay overlays over it, install the first-boot agent, make the tree
//! clone-ready, and assemble a GPT + UEFI disk without loop devices or mounts.

pub mod acl;
pub mod boot;
pub mod build;
pub mod cache;
pub mod cli;
pub mod diff;
pub mod disk;
pub mod exec;
pub mod hosttools;
pub mod interrupt;
pub mod logging;
pub mod proxmox;
pub mod qga;
pub mod recipe;
pub mod seed;
pub mod size;
pub mod sources;
pub mod userns;
