//! Every datasource, read from fixtures that copy the real on-disk layouts.

mod common;

use omni_firstboot::datasource::{self, Env, MetaFormat, NetworkFormat, fs};
use omni_firstboot::fsutil::Root;

#[test]
fn a_proxmox_iso_is_read_with_its_real_file_names() {
    let dir = tempfile::tempdir().unwrap();
    let files = common::proxmox_files(None);
    let iso = common::iso(dir.path(), "cidata", &files);
    assert_eq!(
        fs::probe(&iso).unwrap(),
        Some((fs::FsKind::Iso9660, "cidata".into()))
    );
    let ds = datasource::explicit(&iso).unwrap();
    assert!(ds.name().starts_with("nocloud iso9660"), "{}", ds.name());
    let seed = ds.read().unwrap();
    assert_eq!(seed.user_data.as_deref(), Some(files[0].1.as_slice()));
    assert_eq!(seed.meta_data.as_deref(), Some(files[1].1.as_slice()));
    assert_eq!(
        seed.network,
        Some((NetworkFormat::CloudInit, files[2].1.clone()))
    );
    assert_eq!(seed.vendor_data.as_deref(), Some(&b""[..]));
}

#[test]
fn a_vfat_seed_labelled_in_capitals_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let files = common::proxmox_files(None);
    let img = common::vfat(dir.path(), "CIDATA", &files);
    assert_eq!(
        fs::probe(&img).unwrap(),
        Some((fs::FsKind::Fat, "CIDATA".into()))
    );
    let seed = datasource::explicit(&img).unwrap().read().unwrap();
    assert_eq!(seed.user_data.as_deref(), Some(files[0].1.as_slice()));
    assert_eq!(seed.network.unwrap().1, files[2].1);
}

#[test]
fn a_configdrive2_iso_and_tree_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let tree = common::fixtures().join("configdrive");
    let mut files = Vec::new();
    for name in [
        "openstack/latest/user_data",
        "openstack/latest/meta_data.json",
        "openstack/latest/vendor_data.json",
        "openstack/content/0000",
    ] {
        files.push((name, fs_err::read(tree.join(name)).unwrap()));
    }
    let iso = common::iso(dir.path(), "config-2", &files);
    for ds in [
        datasource::explicit(&iso).unwrap(),
        datasource::explicit(&tree).unwrap(),
    ] {
        assert!(ds.name().starts_with("configdrive2"), "{}", ds.name());
        let seed = ds.read().unwrap();
        assert_eq!(seed.meta_format, MetaFormat::OpenStack);
        assert_eq!(seed.user_data.as_deref(), Some(files[0].1.as_slice()));
        let (format, network) = seed.network.unwrap();
        assert_eq!(format, NetworkFormat::Interfaces);
        assert_eq!(network, files[3].1);
    }
}

#[test]
fn devices_are_found_by_label_through_sysfs_and_through_udev_links() {
    let dir = tempfile::tempdir().unwrap();
    let iso = common::iso(dir.path(), "cidata", &common::proxmox_files(None));
    let root = dir.path().join("machine");
    // The disk (no filesystem we know) and the CD-ROM holding the seed.
    fs_err::create_dir_all(root.join("sys/class/block/sr0")).unwrap();
    fs_err::create_dir_all(root.join("sys/class/block/vda")).unwrap();
    fs_err::create_dir_all(root.join("dev")).unwrap();
    fs_err::write(root.join("dev/vda"), vec![0u8; 65536]).unwrap();
    fs_err::copy(&iso, root.join("dev/sr0")).unwrap();
    let env = Env::new(Root::new(&root));
    let ds = datasource::discover(&env)
        .unwrap()
        .expect("the seed is found");
    assert!(ds.name().contains("/dev/sr0"), "{}", ds.name());

    fs_err::remove_dir_all(root.join("sys/class/block/sr0")).unwrap();
    assert!(datasource::discover(&env).unwrap().is_none());
    fs_err::create_dir_all(root.join("dev/disk/by-label")).unwrap();
    std::os::unix::fs::symlink("../../sr0", root.join("dev/disk/by-label/cidata")).unwrap();
    let ds = datasource::discover(&env)
        .unwrap()
        .expect("found through the link");
    assert!(ds.read().unwrap().meta_data.is_some());
}

#[test]
fn the_kernel_command_line_and_the_seed_directory_are_sources() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("machine");
    let files = common::proxmox_files(None);
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
    common::seed_dir(
        root.join("var/lib/cloud/seed/nocloud").parent().unwrap(),
        &refs,
    );
    fs_err::rename(
        root.join("var/lib/cloud/seed/seed"),
        root.join("var/lib/cloud/seed/nocloud"),
    )
    .unwrap();
    let env = Env::new(Root::new(&root));
    let ds = datasource::discover(&env).unwrap().unwrap();
    assert!(ds.name().contains("seed directory"), "{}", ds.name());

    common::seed_dir(&root.join("srv"), &refs);
    fs_err::create_dir_all(root.join("proc")).unwrap();
    fs_err::write(
        root.join("proc/cmdline"),
        "root=/dev/vda2 ds=nocloud;s=file:///srv/seed/\n",
    )
    .unwrap();
    let ds = datasource::discover(&env).unwrap().unwrap();
    assert!(ds.name().contains("kernel command line"), "{}", ds.name());
    assert!(ds.read().unwrap().user_data.is_some());
}

#[test]
fn empty_and_truncated_isos_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.iso");
    fs_err::write(&empty, b"").unwrap();
    let err = datasource::explicit(&empty)
        .err()
        .expect("an empty file is no seed")
        .to_string();
    assert!(err.contains("empty or truncated"), "{err}");

    let iso = common::iso(dir.path(), "cidata", &common::proxmox_files(None));
    let bytes = fs_err::read(&iso).unwrap();
    let cut = dir.path().join("cut.iso");
    fs_err::write(&cut, &bytes[..0x8800]).unwrap();
    let result = datasource::explicit(&cut).and_then(|ds| ds.read());
    let err = format!("{:#}", result.expect_err("a truncated ISO cannot be read"));
    assert!(err.contains("cut.iso"), "{err}");
}
