//! A vector whose storage starts at a cache line. The vector kernels load whole 64-byte lines
//! (AVX-512) or halves of them; an allocator aligns a `Vec<f32>` to 16 bytes only, so most such
//! loads would straddle two lines and cost two of the cache's accesses each.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Bytes of a cache line, the storage's alignment.
const LINE: usize = 64;

/// Element types whose all-zero bits are a value (zeroed storage holds valid elements).
///
/// # Safety
/// All-zero bits must be a value of the type, and the type must not be zero-sized.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}
// SAFETY: zero is 0.0, 0 and 0 for these, each of a few bytes.
unsafe impl Plain for f32 {}
unsafe impl Plain for u16 {}
unsafe impl Plain for i8 {}

/// A growable vector of `T` aligned to a cache line. Its capacity is fixed when it is made:
/// the buffers that use it know their bound (a window cache holds two windows at most).
pub struct LineVec<T: Plain> {
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
}

// SAFETY: a `LineVec` owns its elements as a `Vec` does.
unsafe impl<T: Plain> Send for LineVec<T> {}
unsafe impl<T: Plain> Sync for LineVec<T> {}

impl<T: Plain> LineVec<T> {
    fn layout(cap: usize) -> Layout {
        Layout::array::<T>(cap.max(1)).and_then(|l| l.align_to(LINE)).expect("a LineVec's size overflows")
    }

    /// Room for `cap` elements, none held.
    pub fn with_capacity(cap: usize) -> Self {
        Self::allocate(cap, false)
    }

    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let mut v = Self::allocate(len, true);
        // The storage is zeroed, and zeros are values of `T`.
        v.len = len;
        v
    }

    fn allocate(cap: usize, zeroed: bool) -> Self {
        let layout = Self::layout(cap);
        // SAFETY: the layout's size is not zero (room for one element or more, none zero-sized).
        let ptr = unsafe {
            if zeroed {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        }
        .cast::<T>();
        let Some(ptr) = NonNull::new(ptr) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len: 0, cap }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Appends `values`, which must fit in the capacity.
    pub fn extend_from_slice(&mut self, values: &[T]) {
        assert!(self.len + values.len() <= self.cap, "LineVec: {} + {} elements exceed its capacity of {}", self.len, values.len(), self.cap);
        // SAFETY: the destination lies within the allocation, past the elements held.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.as_ptr().add(self.len), values.len()) };
        self.len += values.len();
    }

    /// Drops the first `n` elements (or all), moving the rest to the front.
    pub fn drain_front(&mut self, n: usize) {
        let n = n.min(self.len);
        // SAFETY: both ranges lie within the elements held; `copy` allows them to overlap.
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(n), self.ptr.as_ptr(), self.len - n) };
        self.len -= n;
    }
}

impl<T: Plain> Drop for LineVec<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `allocate` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), Self::layout(self.cap)) };
    }
}

impl<T: Plain> Clone for LineVec<T> {
    /// The same elements in the same capacity.
    fn clone(&self) -> Self {
        let mut v = Self::with_capacity(self.cap);
        v.extend_from_slice(self);
        v
    }
}

impl<T: Plain> Default for LineVec<T> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<T: Plain> std::ops::Deref for LineVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the first `len` elements are initialised (zeroed or copied in).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for LineVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain + PartialEq> PartialEq for LineVec<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for LineVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::LineVec;

    #[test]
    fn starts_a_line_and_acts_as_a_vec() {
        let mut v = LineVec::<f32>::with_capacity(10);
        let mut plain = Vec::new();
        for chunk in [&[1.0, 2.0, 3.0][..], &[4.0], &[5.0, 6.0, 7.0, 8.0]] {
            v.extend_from_slice(chunk);
            plain.extend_from_slice(chunk);
        }
        assert_eq!((v.as_ptr() as usize % 64, &v[..]), (0, &plain[..]));
        v.drain_front(3);
        plain.drain(..3);
        assert_eq!(&v[..], &plain[..]);
        let copy = v.clone();
        assert_eq!((copy.as_ptr() as usize % 64, copy.capacity(), &copy[..]), (0, 10, &plain[..]));
        v.drain_front(100);
        assert!(v.is_empty());
        assert_eq!(&LineVec::<i8>::zeroed(5)[..], &[0; 5]);
        assert!(LineVec::<f32>::default().is_empty());
    }

    #[test]
    #[should_panic(expected = "exceed its capacity")]
    fn refuses_to_grow_past_its_capacity() {
        LineVec::<f32>::with_capacity(2).extend_from_slice(&[1.0, 2.0, 3.0]);
    }
}
