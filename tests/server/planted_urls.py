"""A URLconf for tests: the project's own, plus views with a planted bug under /api/ and
outside it, to see what an unhandled crash answers (tests/server/test_api_errors.py)."""

from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.views import APIView

from fleet.urls import handler400, handler403, handler404, handler500
from fleet.urls import urlpatterns as fleet_urlpatterns

__all__ = ["handler400", "handler403", "handler404", "handler500", "urlpatterns"]


def crash(request):
    raise RuntimeError("planted bug")


class CrashingApiView(APIView):
    permission_classes = [AllowAny]

    def get(self, request):
        raise RuntimeError("planted bug")


urlpatterns = [
    path("api/v1/planted-crash", crash),
    path("api/v1/planted-drf-crash", CrashingApiView.as_view()),
    path("planted-crash", crash),
    *fleet_urlpatterns,
]
