//! Test doubles shared by the agent's unit tests and the whole-system tests, so that each
//! exists once: [`kube_api`], an in-process stand-in for the Kubernetes API server (the one
//! part of the system that cannot run here for real).

pub mod kube_api;
