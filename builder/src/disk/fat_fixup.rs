//! Repairs the `.` and `..` entries of folders that fatfs 0.3.6 (the newest release) creates.
//!
//! That version writes a long-name entry before each of them, so they are not the first two
//! entries of the folder, and points `..` of a root's child at the root cluster instead of
//! 0. UEFI firmware tolerates it, `fsck.vfat` does not. This pass walks every folder on a
//! FAT32 volume and rewrites its entries in place: `.` and `..` first without long names,
//! `..` of the root's children set to 0, everything else kept in order.

use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail};

const ENTRY: usize = 32;
const ATTR_DIR: u8 = 0x10;
const ATTR_LFN: u8 = 0x0f;
const END_OF_CHAIN: u32 = 0x0fff_fff8;

struct Volume<T> {
    io: T,
    cluster_bytes: u64,
    data_start: u64,
    fat_start: u64,
    root_cluster: u32,
}

impl<T: Read + Write + Seek> Volume<T> {
    fn open(mut io: T) -> Result<Self> {
        let mut bpb = [0u8; 512];
        io.seek(SeekFrom::Start(0))?;
        io.read_exact(&mut bpb)?;
        let u16_at = |o: usize| u16::from_le_bytes([bpb[o], bpb[o + 1]]) as u64;
        let u32_at = |o: usize| u32::from_le_bytes(bpb[o..o + 4].try_into().unwrap());
        let bytes_per_sector = u16_at(11);
        let sectors_per_cluster = bpb[13] as u64;
        let reserved = u16_at(14);
        let fats = bpb[16] as u64;
        let fat_size = u32_at(36) as u64;
        if u16_at(22) != 0 || fat_size == 0 {
            bail!("not a FAT32 volume");
        }
        Ok(Volume {
            io,
            cluster_bytes: bytes_per_sector * sectors_per_cluster,
            fat_start: reserved * bytes_per_sector,
            data_start: (reserved + fats * fat_size) * bytes_per_sector,
            root_cluster: u32_at(44),
        })
    }

    fn next_cluster(&mut self, cluster: u32) -> Result<u32> {
        let mut buf = [0u8; 4];
        self.io
            .seek(SeekFrom::Start(self.fat_start + cluster as u64 * 4))?;
        self.io.read_exact(&mut buf)?;
        Ok(u32::from_le_bytes(buf) & 0x0fff_ffff)
    }

    fn chain(&mut self, first: u32) -> Result<Vec<u32>> {
        let mut out = vec![first];
        let mut c = first;
        loop {
            c = self.next_cluster(c)?;
            if !(2..END_OF_CHAIN).contains(&c) {
                return Ok(out);
            }
            if out.len() > 65_536 {
                bail!("cluster chain from {first} does not end");
            }
            out.push(c);
        }
    }

    fn offset(&self, cluster: u32) -> u64 {
        self.data_start + (cluster as u64 - 2) * self.cluster_bytes
    }

    fn read_dir(&mut self, chain: &[u32]) -> Result<Vec<u8>> {
        let mut data = vec![0u8; chain.len() * self.cluster_bytes as usize];
        for (i, c) in chain.iter().enumerate() {
            let at = self.offset(*c);
            self.io.seek(SeekFrom::Start(at))?;
            let n = self.cluster_bytes as usize;
            self.io.read_exact(&mut data[i * n..(i + 1) * n])?;
        }
        Ok(data)
    }

    fn write_dir(&mut self, chain: &[u32], data: &[u8]) -> Result<()> {
        let n = self.cluster_bytes as usize;
        for (i, c) in chain.iter().enumerate() {
            let at = self.offset(*c);
            self.io.seek(SeekFrom::Start(at))?;
            self.io.write_all(&data[i * n..(i + 1) * n])?;
        }
        Ok(())
    }
}

fn is_dot(e: &[u8]) -> bool {
    &e[..11] == b".          "
}
fn is_dotdot(e: &[u8]) -> bool {
    &e[..11] == b"..         "
}
fn first_cluster(e: &[u8]) -> u32 {
    (u16::from_le_bytes([e[20], e[21]]) as u32) << 16 | u16::from_le_bytes([e[26], e[27]]) as u32
}
fn set_first_cluster(e: &mut [u8], c: u32) {
    e[20..22].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
    e[26..28].copy_from_slice(&(c as u16).to_le_bytes());
}

/// Rewrites one folder's entries; returns the sub-folders found in it.
fn fix_entries(data: &mut [u8], parent_is_root: bool) -> Vec<u32> {
    let entries: Vec<[u8; ENTRY]> = data
        .chunks(ENTRY)
        .take_while(|e| e[0] != 0)
        .map(|e| e.try_into().unwrap())
        .collect();
    let (mut dot, mut dotdot, mut rest) = (None, None, Vec::new());
    let mut lfn_run: Vec<[u8; ENTRY]> = Vec::new();
    for e in entries {
        if e[0] == 0xe5 {
            lfn_run.clear();
            continue;
        }
        if e[11] == ATTR_LFN {
            lfn_run.push(e);
            continue;
        }
        if is_dot(&e) {
            dot = Some(e);
            lfn_run.clear();
        } else if is_dotdot(&e) {
            let mut e = e;
            if parent_is_root {
                set_first_cluster(&mut e, 0);
            }
            dotdot = Some(e);
            lfn_run.clear();
        } else {
            rest.append(&mut lfn_run);
            rest.push(e);
        }
    }
    let subdirs = rest
        .iter()
        .filter(|e| e[11] != ATTR_LFN && e[11] & ATTR_DIR != 0)
        .map(|e| first_cluster(e))
        .collect();
    let ordered: Vec<[u8; ENTRY]> = dot.into_iter().chain(dotdot).chain(rest).collect();
    data.fill(0);
    for (i, e) in ordered.iter().enumerate() {
        data[i * ENTRY..(i + 1) * ENTRY].copy_from_slice(e);
    }
    subdirs
}

pub fn repair<T: Read + Write + Seek>(io: T) -> Result<()> {
    let mut vol = Volume::open(io).context("reading the FAT32 boot sector")?;
    let root = vol.root_cluster;
    let root_chain = vol.chain(root)?;
    let mut root_data = vol.read_dir(&root_chain)?;
    // The root itself has no `.` entries; only collect its sub-folders.
    let mut todo: Vec<(u32, bool)> = fix_entries(&mut root_data, false)
        .into_iter()
        .map(|c| (c, true))
        .collect();
    vol.write_dir(&root_chain, &root_data)?;
    let mut seen = 0;
    while let Some((cluster, parent_is_root)) = todo.pop() {
        seen += 1;
        if seen > 10_000 {
            bail!("too many folders on the ESP");
        }
        let chain = vol.chain(cluster)?;
        let mut data = vol.read_dir(&chain)?;
        let subdirs = fix_entries(&mut data, parent_is_root);
        vol.write_dir(&chain, &data)?;
        todo.extend(subdirs.into_iter().map(|c| (c, false)));
    }
    vol.io.flush()?;
    Ok(())
}
