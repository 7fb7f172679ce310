//! Generates the topology of a local cluster from its shape: regions named
//! `a`, `b`, `c`…, storage nodes `a1`, `a2`…, one coordinator (`a-co1`) and
//! one gateway (`a-gw1`) per region, all on loopback. Internal ports are
//! picked free once and kept in the generated file, so restarts reuse them.

use crate::cluster::ANTI_ENTROPY_SUFFIX;
use crate::{LaunchError, free_port, postgres};
use geolog_config::{GeologConfig, NodeConfig, ProcessConfig, RegionConfig};

/// The shape of a generated cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub regions: usize,
    pub nodes_per_region: usize,
    pub replication_factor: usize,
}

/// `0 → "a"`, `1 → "b"`, … `26 → "r26"`.
pub fn region_name(index: usize) -> String {
    if index < 26 {
        ((b'a' + index as u8) as char).to_string()
    } else {
        format!("r{index}")
    }
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A topology of `shape`; region `i`'s gateway listens on `gateway_port + i`
/// (or a free port when `gateway_port` is 0).
pub fn generate(shape: Shape, gateway_port: u16) -> Result<GeologConfig, LaunchError> {
    if shape.regions == 0 || shape.nodes_per_region == 0 {
        return Err(LaunchError::Invalid(
            "need at least one region and one node per region".into(),
        ));
    }
    if shape.replication_factor == 0 || shape.replication_factor > shape.nodes_per_region {
        return Err(LaunchError::Invalid(format!(
            "replication factor {} must be between 1 and the {} nodes per region",
            shape.replication_factor, shape.nodes_per_region
        )));
    }
    let mut regions = Vec::with_capacity(shape.regions);
    for r in 0..shape.regions {
        let name = region_name(r);
        let gateway_port = if gateway_port == 0 {
            free_port()?
        } else {
            gateway_port + r as u16
        };
        let nodes = (1..=shape.nodes_per_region)
            .map(|n| {
                Ok(NodeConfig {
                    id: format!("{name}{n}"),
                    addr: loopback(free_port()?),
                    database_url: Some(postgres::database_url(free_port()?)),
                    metrics_addr: Some(loopback(free_port()?)),
                })
            })
            .collect::<Result<Vec<_>, LaunchError>>()?;
        regions.push(RegionConfig {
            replication_factor: shape.replication_factor,
            gateways: vec![ProcessConfig {
                id: format!("{name}-gw1"),
                addr: loopback(gateway_port),
                metrics_addr: None,
            }],
            coordinators: vec![ProcessConfig {
                id: format!("{name}-co1"),
                addr: loopback(free_port()?),
                metrics_addr: Some(loopback(free_port()?)),
            }],
            anti_entropy: vec![ProcessConfig {
                id: format!("{name}{ANTI_ENTROPY_SUFFIX}"),
                addr: loopback(free_port()?),
                metrics_addr: None,
            }],
            nodes,
            name,
        });
    }
    let config = GeologConfig {
        regions,
        ..Default::default()
    };
    config.validate()?;
    Ok(config)
}

/// The shape of an existing topology, when it is uniform.
pub fn shape_of(config: &GeologConfig) -> Shape {
    Shape {
        regions: config.regions.len(),
        nodes_per_region: config.regions.first().map_or(0, |r| r.nodes.len()),
        replication_factor: config.regions.first().map_or(0, |r| r.replication_factor),
    }
}
