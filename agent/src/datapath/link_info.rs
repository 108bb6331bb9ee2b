//! Which interface a pinned TCX link holds the classifier on, read from the kernel (`BPF_OBJ_GET`, then
//! `BPF_OBJ_GET_INFO_BY_FD`): a link whose interface was deleted is severed (interface 0), and one pinned for a
//! name may hold another interface (the name re-created, or the interface renamed, while no agent ran).
//!
//! aya 0.14 opens pins and reads link info, but keeps both the descriptor and the TCX fields private, so the two
//! commands are made here; their layouts are the kernel's stable UAPI (`include/uapi/linux/bpf.h`).
#![expect(
    unsafe_code,
    reason = "aya keeps the link's descriptor and TCX fields private: two bpf(2) commands are made here"
)]

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` and its `tcx` member (the union starts 8-aligned, at 16), with room for
/// the union's larger members, which the kernel fills for other link types.
#[repr(C)]
#[derive(Default)]
struct TcxLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    ifindex: u32,
    attach_type: u32,
    _rest: [u64; 8],
}

/// Where the link pinned at `path` holds its program: `Some(ifindex)`, or `None` when the link is severed (its
/// interface was deleted) or is no TCX link. A missing pin is an error of kind `NotFound`.
pub(super) fn pinned_tcx_interface(path: &Path) -> io::Result<Option<u32>> {
    let info = pinned_link(path)?;
    Ok((info.link_type == BPF_LINK_TYPE_TCX && info.ifindex != 0).then_some(info.ifindex))
}

/// The id of the program the link pinned at `path` runs.
pub(super) fn pinned_link_program(path: &Path) -> io::Result<u32> {
    Ok(pinned_link(path)?.prog_id)
}

fn pinned_link(path: &Path) -> io::Result<TcxLinkInfo> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut get = ObjGetAttr { pathname: path.as_ptr() as u64, ..ObjGetAttr::default() };
    // SAFETY: `get` is a valid BPF_OBJ_GET attribute whose `pathname` points at a NUL-terminated string that
    // outlives the call; the size passed is the struct's own.
    let fd = unsafe { bpf(BPF_OBJ_GET, (&raw mut get).cast(), size_of::<ObjGetAttr>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = TcxLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: size_of::<TcxLinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr.info` points at `info`, writable for `info_len` bytes, for the duration of the call.
    let result = unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, (&raw mut attr).cast(), size_of::<InfoAttr>()) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// The `bpf(2)` system call.
///
/// # Safety
/// `attr` must point at a valid attribute for `command`, readable (and writable where the command writes) for
/// `size` bytes.
unsafe fn bpf(command: libc::c_long, attr: *mut libc::c_void, size: usize) -> libc::c_long {
    // SAFETY: the caller's contract.
    unsafe { libc::syscall(libc::SYS_bpf, command, attr, size) }
}
