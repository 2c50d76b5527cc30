//! Test doubles and helpers shared by the unit, process-level and whole-system tests, so that
//! each exists once: [`kube_api`], an in-process stand-in for the Kubernetes API server (the one
//! part of the system that cannot run here for real), and [`process`], for tests that start
//! binaries.

pub mod kube_api;
pub mod process;
